"""The `identity` backend: returns the render unchanged, at no cost.

For measuring the server's own overhead (bench/) and for tests of the plumbing
(batching, queueing, caching): it batches (any number of edits per call), and
it accepts any instruction and parameters; the reported timestep is 0.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditItem, EditParams, EditRejected, EditResult


class IdentityBackend(EditBackend):
    """Edit = the render itself."""

    supports_batching = True

    def __init__(self) -> None:
        self.batch_sizes: List[int] = []  # sizes of the edit_batch calls, for tests

    def info(self) -> BackendInfo:
        return BackendInfo(model="", device="cpu", precision="n/a", known_instructions=[])

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        if original.shape != render.shape:
            raise EditRejected(f"original shape {tuple(original.shape)} must equal render shape {tuple(render.shape)}")
        return EditResult(image=render, timestep=0)

    def edit_batch(self, items: Sequence[EditItem]) -> List[Union[EditResult, Exception]]:
        self.batch_sizes.append(len(items))
        return super().edit_batch(items)

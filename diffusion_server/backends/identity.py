"""The `identity` backend: returns the render unchanged, at no cost.

For measuring the server's own overhead (bench/) and for tests of the plumbing
(batching, queueing, caching): it batches (any number of edits per call), and
it accepts any instruction and parameters; the reported timestep is 0.
`--delay-ms` gives every edit a fixed cost (a sleep), for load tests.
"""

from __future__ import annotations

import time

import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditParams, EditRejected, EditResult


class IdentityBackend(EditBackend):
    """Edit = the render itself."""

    name = "identity"
    supports_batching = True
    accepts_uint8 = True  # returns the render as it came: no conversion either way

    def __init__(self, delay_s: float = 0.0, device: str = "cpu") -> None:
        self.delay_s = delay_s  # fixed cost of each edit (a sleep), for load tests; 0: none
        self.device = device  # only reported (Describe): it computes nothing

    def info(self) -> BackendInfo:
        return BackendInfo(
            model="",
            device=self.device,
            precision="n/a",
            ignored_fields=[
                "instruction",
                *["guidance_scale", "image_guidance_scale", "diffusion_steps", "lower_bound", "upper_bound"],
            ],
        )

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        if original.shape != render.shape:
            raise EditRejected(f"original shape {tuple(original.shape)} must equal render shape {tuple(render.shape)}")
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        return EditResult(image=render, timestep=0)


def make_backend(
    model: str, device: str, precision: str, seed: int, options: object | None = None, delay_ms: float = 0.0
) -> IdentityBackend:
    """Registry factory: `delay_ms` is --delay-ms (a fixed cost per edit); model, precision and seed are ignored."""
    from diffusion_server.backends import no_torch_options

    no_torch_options("identity", options)  # type: ignore[arg-type]
    return IdentityBackend(delay_s=delay_ms / 1e3, device=device)

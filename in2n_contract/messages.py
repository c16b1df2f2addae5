"""`EditParams` and images -> the `EditRequest` message: how a client says what it wants edited."""

from __future__ import annotations

import numpy as np

from in2n_contract import EditParams, pb
from in2n_contract.codec import wire_image


def make_request(
    request_id: str, view_id: int, render: np.ndarray, original: np.ndarray | None, params: EditParams
) -> pb.EditRequest:
    """Build an `EditRequest`; every parameter of `params` is sent explicitly (seed only when set).

    Args:
        render: [H, W, 3] uint8 in 0..255, or float16/float32 in [0, 1]; the NeRF render of the view.
        original: [H, W, 3], same height and width; the captured image of the view (None: left out,
            for a request that names a cached original by `original_key`).
    """
    request = pb.EditRequest(
        request_id=request_id,
        view_id=int(view_id),
        render=wire_image(render, "render"),
        instruction=params.instruction,
        guidance_scale=params.guidance_scale,
        image_guidance_scale=params.image_guidance_scale,
        diffusion_steps=params.diffusion_steps,
        lower_bound=params.lower_bound,
        upper_bound=params.upper_bound,
    )
    if original is not None:
        request.original.CopyFrom(wire_image(original, "original"))
    if params.seed is not None:
        request.seed = int(params.seed)
    return request

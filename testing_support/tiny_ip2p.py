"""The tiny random IP2P (`diffusion_server.backends.tiny_ip2p`) saved in diffusers format, for tests of the real
loading code (`Ip2pBackend.from_pretrained`)."""

from __future__ import annotations

import os

from diffusion_server.backends.tiny_ip2p import tiny_components


def save_tiny_ip2p(path: str | os.PathLike, seed: int = 0) -> str:
    """Save the tiny model of `seed` in diffusers format under `path` (created if needed).

    `Ip2pBackend.from_pretrained(path)` then loads it through the real loading code.
    Returns the folder as a string.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 - the seed's errors are ValueErrors, as the other arguments'
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        **tiny_components(seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = os.fspath(path)
    pipe.save_pretrained(folder)
    return folder

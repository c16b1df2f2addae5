"""The palette backend: each look against its documented formula, matching rules, determinism, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffusion_server.backends import BACKEND_NAMES, create_backend
from diffusion_server.backends.base import EditRejected
from diffusion_server.backends.palette import PaletteBackend, known_instructions
from in2n_contract import EditParams


def expected_look(look: str, x: np.ndarray) -> np.ndarray:
    """The formulas of palette.py's docstring, written again here in float64."""
    x = x.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b

    def unit_luma(t):
        t = np.asarray(t, dtype=np.float64)
        return t / (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])

    if look == "identity":
        out = x
    elif look == "sepia":
        out = y[..., None] * unit_luma([1.0, 0.85, 0.62])
    elif look == "night":
        out = np.minimum(y, 0.35)[..., None] * unit_luma([0.45, 0.6, 1.0])
    elif look == "grayscale":
        out = np.stack([y, y, y], -1)
    elif look == "invert":
        out = 1.0 - x
    elif look in ("red", "green", "blue"):
        colour = np.full(3, 0.35)
        colour[("red", "green", "blue").index(look)] = 1.0
        out = y[..., None] * unit_luma(colour)
    else:
        raise ValueError(look)
    return np.clip(out, 0.0, 1.0)


def random_image(seed: int, h: int = 6, w: int = 7) -> np.ndarray:
    """[h, w, 3] float32 in [0, 1], with exact 0 and 1 corners."""
    image = np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)
    image[0, 0] = 0.0
    image[-1, -1] = 1.0
    return image


CASES = [
    ("make it sepia", "sepia"),
    ("Make it look like night.", "night"),
    ("turn it red", "red"),
    ("make it red", "red"),
    ("Make it GREEN!", "green"),
    ("turn it blue", "blue"),
    ("make it grayscale", "grayscale"),
    ("make it black-and-white", "grayscale"),
    ("invert the colors", "invert"),
    ("Don't change the image", "identity"),
    ("  do not   change the image ", "identity"),
]


@pytest.mark.parametrize("instruction,look", CASES)
def test_each_look_follows_its_formula(instruction: str, look: str) -> None:
    backend = PaletteBackend()
    render, original = random_image(1), random_image(2)
    result = backend.edit(render, original, EditParams(instruction=instruction))
    assert result.image.dtype == np.float32 and result.image.shape == render.shape
    np.testing.assert_allclose(result.image, expected_look(look, render), rtol=0, atol=1e-6)
    assert result.image.min() >= 0.0 and result.image.max() <= 1.0
    assert result.timestep == 0


def test_night_is_dark_and_blue() -> None:
    render = random_image(3)
    night = PaletteBackend().edit(render, render, EditParams("make it look like night")).image
    assert night.mean() < render.mean()
    assert night[..., 2].mean() > night[..., 0].mean()  # blue-tinted on average


def test_edit_is_deterministic_and_ignores_original_and_parameters() -> None:
    backend = PaletteBackend()
    render = random_image(4)
    a = backend.edit(render, random_image(5), EditParams("make it sepia", seed=1)).image
    b = backend.edit(render, random_image(6), EditParams("make it sepia", guidance_scale=0.0, seed=2)).image
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(render, random_image(4))  # input untouched


def test_unknown_instruction_lists_known_ones() -> None:
    backend = PaletteBackend()
    with pytest.raises(EditRejected) as info:
        backend.check(EditParams("turn him into a bronze statue"))
    message = str(info.value)
    assert "'turn him into a bronze statue'" in message and "palette" in message
    for phrase in known_instructions():
        assert f'"{phrase}"' in message
    with pytest.raises(EditRejected):
        backend.edit(random_image(1), random_image(1), EditParams("turn him into a bronze statue"))


def test_size_mismatch_is_rejected() -> None:
    with pytest.raises(EditRejected, match="original"):
        PaletteBackend().edit(random_image(1, 4, 4), random_image(1, 4, 5), EditParams("make it sepia"))


def test_info() -> None:
    info = PaletteBackend().info()
    assert (info.device, info.precision, info.model) == ("cpu", "n/a", "")
    assert "make it sepia" in info.known_instructions and "don't change the image" in info.known_instructions


def test_registry_builds_palette() -> None:
    assert set(BACKEND_NAMES) == {
        "ip2p",
        "tiny-ip2p",
        "palette",
        "identity",
        "ip2p-xl",
        "stochastic",
        "flux-kontext",
        "tiny-flux-kontext",
    }
    assert isinstance(create_backend("palette", device="cpu"), PaletteBackend)


def test_palette_server_path_imports_no_torch(child_env: dict) -> None:
    code = (
        "import sys\n"
        "import diffusion_server.server, in2n_client, diffusion_server.__main__\n"
        "from diffusion_server.backends import create_backend\n"
        "create_backend('palette', device='cpu')\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env, timeout=60)


@pytest.mark.parametrize("instruction", ["make it sepia", "make it look like night", "make it grayscale", "turn it red",
                                         "turn it green", "turn it blue", "don't change the image"])  # fmt: skip
def test_looks_are_projections_so_repeated_edits_do_not_drift(instruction: str) -> None:
    """The Iterative Dataset Update edits renders that already carry the look: a second pass must not move them."""
    backend = PaletteBackend()
    image = random_image(3, 16, 16) * np.float32(0.4)  # dim enough that no look clamps
    once = backend.edit(image, image, EditParams(instruction)).image
    twice = backend.edit(once, image, EditParams(instruction)).image
    np.testing.assert_allclose(twice, once, rtol=0, atol=1e-5)
    bright = random_image(
        4, 16, 16
    )  # with clamping, passes only darken what clamped: they settle, never drift to white
    first = backend.edit(bright, bright, EditParams(instruction)).image
    for _ in range(20):
        bright = backend.edit(bright, bright, EditParams(instruction)).image
    again = backend.edit(bright, bright, EditParams(instruction)).image
    np.testing.assert_allclose(again, bright, rtol=0, atol=0.02)
    assert bright.mean() <= first.mean() + 1e-6 and bright.mean() > 0.5 * first.mean()

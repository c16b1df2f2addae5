"""The `palette` backend: a classical, deterministic, offline editor for demos and tests.

It edits the render (the start image, as IP2P does) toward a colour look named
by the instruction; the original only has to match the render's size. Each
look is a pure per-pixel function of the render x = (R, G, B) in [0, 1],
computed in float32, then clamped to [0, 1]:

    Y (luma)   = 0.299 R + 0.587 G + 0.114 B
    T(t)       = t / (0.299 t_R + 0.587 t_G + 0.114 t_B)    a tone whose luma is 1
    identity   : x
    sepia      : Y T(1.0, 0.85, 0.62)
    night      : min(Y, 0.35) T(0.45, 0.6, 1.0)              dark and blue
    grayscale  : (Y, Y, Y)
    invert     : 1 - x
    tint c     : Y T(c + 0.35 (1 - c)), with c = (1, 0, 0) red, (0, 1, 0) green, (0, 0, 1) blue

Every look but invert is a projection: applied to an image that already has
the look, it changes nothing (up to clamping), as an instruction-following
editor conditioned on the captured image would. That matters under the
Iterative Dataset Update, which edits renders that already carry earlier
edits: a look that compounded (a sepia matrix brightens by 1.35 at each pass)
would drift to white. Invert flips at each pass: use it for single edits.

Instructions match case-insensitively after dropping apostrophes, turning
other punctuation into spaces and collapsing whitespace ("Don't change the
image!" == "dont change the image"). Edit parameters other than the
instruction are accepted and ignored; the reported timestep is 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditParams, EditRejected, EditResult

log = logging.getLogger(__name__)

Look = Callable[[np.ndarray], np.ndarray]
"""[H, W, 3] float32 -> [H, W, 3] float32 (before clamping)."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def tone(r: float, g: float, b: float) -> np.ndarray:
    """[3] colour with luma 1: multiplying a luma by it keeps that luma."""
    t = np.array([r, g, b], dtype=np.float64)
    return (t / float(t @ _LUMA.astype(np.float64))).astype(np.float32)


_SEPIA_TONE = tone(1.0, 0.85, 0.62)
_NIGHT_TONE = tone(0.45, 0.6, 1.0)
_NIGHT_MAX_LUMA = np.float32(0.35)


def luma(x: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [H, W, 1] Rec. 601 luma."""
    return (x @ _LUMA)[..., None]


def _identity(x: np.ndarray) -> np.ndarray:
    return x.copy()


def _sepia(x: np.ndarray) -> np.ndarray:
    return luma(x) * _SEPIA_TONE


def _night(x: np.ndarray) -> np.ndarray:
    return np.minimum(luma(x), _NIGHT_MAX_LUMA) * _NIGHT_TONE


def _grayscale(x: np.ndarray) -> np.ndarray:
    return np.repeat(luma(x), 3, axis=-1)


def _invert(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) - x


def _tint(channel: int) -> Look:
    colour = np.full(3, 0.35, dtype=np.float32)
    colour[channel] = 1.0
    colour_tone = tone(*colour)

    def look(x: np.ndarray) -> np.ndarray:
        return luma(x) * colour_tone

    return look


# look name -> (function, phrasings); the first phrasing is the canonical one.
LOOKS: dict[str, tuple[Look, list[str]]] = {
    "identity": (_identity, ["don't change the image", "do not change the image", "keep it the same", "no change"]),
    "sepia": (_sepia, ["make it sepia", "turn it sepia", "make it look like an old photo"]),
    "night": (_night, ["make it look like night", "make it night", "turn it into night", "make it nighttime"]),
    "grayscale": (
        _grayscale,
        ["make it grayscale", "make it greyscale", "make it black and white", "turn it black and white"],
    ),
    "invert": (_invert, ["invert the colors", "invert the colours", "make it a negative"]),
    "red": (_tint(0), ["turn it red", "make it red"]),
    "green": (_tint(1), ["turn it green", "make it green"]),
    "blue": (_tint(2), ["turn it blue", "make it blue"]),
}


def normalize_instruction(text: str) -> str:
    """Lower-case, drop apostrophes, other punctuation -> space, collapse whitespace."""
    text = re.sub(r"['\u2019`]", "", text.lower())
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


_LOOK_OF: dict[str, str] = {normalize_instruction(p): name for name, (_, phrases) in LOOKS.items() for p in phrases}


def known_instructions() -> list[str]:
    """Every phrasing the palette backend understands, as written in `LOOKS`."""
    return [p for _, phrases in LOOKS.values() for p in phrases]


def look_of(instruction: str) -> str:
    """Name of the look `instruction` asks for; raises `EditRejected` for an unknown one."""
    name = _LOOK_OF.get(normalize_instruction(instruction))
    if name is None:
        known = ", ".join(f'"{p}"' for p in known_instructions())
        raise EditRejected(f"unknown instruction '{instruction}' for the palette backend; it knows: {known}")
    return name


def apply_look(name: str, render: np.ndarray) -> np.ndarray:
    """Apply look `name` to a [H, W, 3] image in [0, 1]; returns [H, W, 3] float32 clamped to [0, 1]."""
    x = np.asarray(render, dtype=np.float32)
    return np.clip(LOOKS[name][0](x), 0.0, 1.0).astype(np.float32, copy=False)


class PaletteBackend(EditBackend):
    """Deterministic colour looks chosen by instruction; CPU only, no weights."""

    name = "palette"

    def info(self) -> BackendInfo:
        return BackendInfo(
            model="",
            device="cpu",
            precision="n/a",
            known_instructions=known_instructions(),
            ignored_fields=[
                "guidance_scale",
                "image_guidance_scale",
                "diffusion_steps",
                "lower_bound",
                "upper_bound",
            ],  # a look per instruction, nothing else
        )

    def check(self, params: EditParams) -> None:
        look_of(params.instruction)

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        if render.ndim != 3 or render.shape[-1] != 3:
            raise EditRejected(f"render must be [H, W, 3], got shape {tuple(render.shape)}")
        if original.shape != render.shape:
            raise EditRejected(f"original shape {tuple(original.shape)} must equal render shape {tuple(render.shape)}")
        return EditResult(image=apply_look(look_of(params.instruction), render), timestep=0)


def make_backend(model: str, device: str, precision: str, seed: int, options: object | None = None) -> PaletteBackend:
    """Registry factory: runs on the CPU whatever `device`; model, precision and seed are ignored."""
    from diffusion_server.backends import no_torch_options

    no_torch_options("palette", options)  # type: ignore[arg-type]
    if device != "cpu":
        log.debug("the palette backend runs on the CPU; --device %s is ignored", device)
    return PaletteBackend()

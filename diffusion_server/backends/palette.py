"""The `palette` backend: a classical, deterministic, offline editor for demos and tests.

It edits the render (the start image, as IP2P does) toward a colour look named
by the instruction; the original only has to match the render's size. Each
look is a pure per-pixel function of the render x = (R, G, B) in [0, 1],
computed in float32 in the order written, then clamped to [0, 1]:

    Y (luma)   = 0.299 R + 0.587 G + 0.114 B
    identity   : x
    sepia      : R' = 0.393 R + 0.769 G + 0.189 B
                 G' = 0.349 R + 0.686 G + 0.168 B
                 B' = 0.272 R + 0.534 G + 0.131 B
    night      : (0.25 R, 0.30 G + 0.02, 0.55 B + 0.08)     dark and blue-tinted
    grayscale  : (Y, Y, Y)
    invert     : 1 - x
    tint c     : 0.4 x + 0.6 Y c, with c = (1, 0, 0) red, (0, 1, 0) green, (0, 0, 1) blue

Instructions match case-insensitively after dropping apostrophes, turning
other punctuation into spaces and collapsing whitespace ("Don't change the
image!" == "dont change the image"). Edit parameters other than the
instruction are accepted and ignored; the reported timestep is 0.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Tuple

import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditParams, EditRejected, EditResult

Look = Callable[[np.ndarray], np.ndarray]
"""[H, W, 3] float32 -> [H, W, 3] float32 (before clamping)."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SEPIA = np.array(  # rows: output channel, columns: input R, G, B
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32
)
_NIGHT_SCALE = np.array([0.25, 0.30, 0.55], dtype=np.float32)
_NIGHT_OFFSET = np.array([0.0, 0.02, 0.08], dtype=np.float32)


def luma(x: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [H, W, 1] Rec. 601 luma."""
    return (x @ _LUMA)[..., None]


def _identity(x: np.ndarray) -> np.ndarray:
    return x.copy()


def _sepia(x: np.ndarray) -> np.ndarray:
    return x @ _SEPIA.T


def _night(x: np.ndarray) -> np.ndarray:
    return x * _NIGHT_SCALE + _NIGHT_OFFSET


def _grayscale(x: np.ndarray) -> np.ndarray:
    return np.repeat(luma(x), 3, axis=-1)


def _invert(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) - x


def _tint(channel: int) -> Look:
    colour = np.zeros(3, dtype=np.float32)
    colour[channel] = 1.0

    def look(x: np.ndarray) -> np.ndarray:
        return np.float32(0.4) * x + np.float32(0.6) * luma(x) * colour

    return look


# look name -> (function, phrasings); the first phrasing is the canonical one.
LOOKS: Dict[str, Tuple[Look, List[str]]] = {
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


_LOOK_OF: Dict[str, str] = {normalize_instruction(p): name for name, (_, phrases) in LOOKS.items() for p in phrases}


def known_instructions() -> List[str]:
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

    def info(self) -> BackendInfo:
        return BackendInfo(model="", device="cpu", precision="n/a", known_instructions=known_instructions())

    def check(self, params: EditParams) -> None:
        look_of(params.instruction)

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        if render.ndim != 3 or render.shape[-1] != 3:
            raise EditRejected(f"render must be [H, W, 3], got shape {tuple(render.shape)}")
        if original.shape != render.shape:
            raise EditRejected(f"original shape {tuple(original.shape)} must equal render shape {tuple(render.shape)}")
        return EditResult(image=apply_look(look_of(params.instruction), render), timestep=0)

"""What a user looks at after an edit: before/after renders and the dataset-evolution sheet.

The evolution sheet has one row per tracked view:
original | the edits it received, oldest to newest (the latest `max_edits`) | render now,
under a header that names the columns ("original", "edits over time ->", "current render").
Written as PNGs into `<run>/edit_report/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[..., 3] float in [0, 1] -> [..., 3] uint8."""
    return (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write atomically (temp file, then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def grid(
    rows: list[list[np.ndarray | None]], pad: int = 2, min_side: int = 128, header: list[str | None] | None = None
) -> np.ndarray:
    """Tile images ([H, W, 3] uint8, all one size; None = blank) into one sheet.

    Small images are enlarged (nearest neighbour, by a whole factor) to at least `min_side`.
    `header`: a label per column (None: none), written in a band above the first row; a label
    may run on over the columns to its right.
    """
    cells = [c for row in rows for c in row if c is not None]
    factor = max(1, -(-min_side // max(cells[0].shape[:2])))
    if factor > 1:
        rows = [[None if c is None else c.repeat(factor, axis=0).repeat(factor, axis=1) for c in row] for row in rows]
        cells = [c for row in rows for c in row if c is not None]
    h, w, _ = cells[0].shape
    ncols = max(len(r) for r in rows)
    top = HEADER_HEIGHT if header else 0
    sheet = np.full((top + len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                y, x = top + pad + i * (h + pad), pad + j * (w + pad)
                sheet[y : y + h, x : x + w] = cell
    if header:
        image = Image.fromarray(sheet)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for j, label in enumerate(header[:ncols]):
            if label:
                draw.text((pad + j * (w + pad) + 2, 4), label, fill=(0, 0, 0), font=font)
        sheet = np.asarray(image).copy()
    return sheet


HEADER_HEIGHT = 20
"""Pixels of the label band above a sheet's first row."""


class EvolutionRecorder:
    """Keeps, for a few views, the original, the edits over time and the renders before and after."""

    def __init__(self, views: list[int], originals: torch.Tensor, max_edits: int = 6) -> None:
        self.views = list(views)
        self.max_edits = max_edits
        self.originals = {v: to_uint8(originals[v]) for v in self.views}
        self.edits: dict[int, list[np.ndarray]] = {v: [] for v in self.views}
        self.before: dict[int, np.ndarray] = {}
        self.after: dict[int, np.ndarray] = {}

    def record_before(self, view: int, image: torch.Tensor) -> None:
        self.before[view] = to_uint8(image)

    def record_after(self, view: int, image: torch.Tensor) -> None:
        self.after[view] = to_uint8(image)

    def record_edit(self, view: int, image: torch.Tensor) -> None:
        if view in self.edits:
            self.edits[view].append(to_uint8(image))
            del self.edits[view][: -self.max_edits]

    def evolution_sheet(self) -> np.ndarray:
        ncols = max([len(e) for e in self.edits.values()] + [0])
        rows = []
        for v in self.views:
            edits: list[np.ndarray | None] = list(self.edits[v]) + [None] * (ncols - len(self.edits[v]))
            rows.append([self.originals[v]] + edits + [self.after.get(v)])
        header = ["original"] + (["edits over time ->"] + [None] * (ncols - 1) if ncols else []) + ["current render"]
        return grid(rows, header=header)

    def write(self, folder: Path) -> None:
        folder = Path(folder)
        save_png(self.evolution_sheet(), folder / "evolution.png")
        for v in self.views:
            if v in self.before:
                save_png(self.before[v], folder / f"view_{v:04d}_before.png")
            if v in self.after:
                save_png(self.after[v], folder / f"view_{v:04d}_after.png")
        pairs = [[self.before.get(v), self.after.get(v)] for v in self.views if v in self.before or v in self.after]
        if pairs:
            save_png(grid(pairs, header=["before", "after"]), folder / "before_after.png")

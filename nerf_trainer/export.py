"""Export the edited dataset of an in2n run as a nerfstudio dataset.

    python -m nerf_trainer.export --run outputs/edits/demo/in2n-tiny/<time> --output data/demo-edited

Reads the run's latest saved edits that load (`<run>/in2n_edits/step-*.pt`) and its
scene's transforms.json, and writes `<output>/transforms.json` and
`<output>/images/`: the training views, each with its current (edited) image;
views never edited keep their original. Intrinsics are rescaled when the run
trained on downscaled images. Any nerfstudio method can train on the result
(`ns-train splatfacto --data <output>`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from nerf_trainer.trainer import EDITS_FOLDER, damage

_INTRINSICS = ("fl_x", "fl_y", "cx", "cy")


@dataclass
class ExportConfig:
    """Write an in2n run's edited training images as a nerfstudio dataset."""

    run: Path
    """The in2n run folder (holding config.yml and in2n_edits/)."""
    output: Path
    """Folder to write transforms.json and images/ into."""
    step: int | None = None
    """Checkpoint step to export; None: the latest saved."""


def export_edited_dataset(config: ExportConfig) -> Path:
    """Write the dataset; returns the path of the new transforms.json."""
    run = Path(config.run)
    if run.name == "config.yml":
        run = run.parent
    saved = sorted((run / EDITS_FOLDER).glob("step-*.pt"))
    if config.step is not None:
        saved = [p for p in saved if p.name == f"step-{config.step:09d}.pt"]
    if not saved:
        raise SystemExit(f"export: no saved edits in {run / EDITS_FOLDER} (is {run} an in2n run with a checkpoint?)")
    state, skipped = None, []
    for path in reversed(saved):  # the newest edits file that loads (a damaged newer one is skipped, and said so)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # noqa: BLE001 - torch raises many kinds (zip, pickle, EOF) for a damaged file
            skipped.append(f"{path.name} ({damage(path, e)})")
    if state is None:
        raise SystemExit(f"export: no loadable edits in {run / EDITS_FOLDER}: " + "; ".join(skipped))
    if skipped:
        print(f"export: using {path.name}; skipped newer: " + "; ".join(skipped), file=sys.stderr)
    trainer_config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    data = Path(trainer_config.pipeline.datamanager.data)
    meta = json.loads((data / "transforms.json").read_text())

    filenames = [Path(f) for f in state["image_filenames"]]  # row i of the buffer = camera i
    edited = {int(v): state["images"][k] for k, v in enumerate(state["views"].tolist())}
    h, w = state["image_shape"][:2]
    by_name = {(data / f["file_path"]).resolve(): f for f in meta["frames"]}
    by_basename = {Path(f["file_path"]).name: f for f in meta["frames"]}  # images_2/... when downscaled
    out = Path(config.output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    frames = []
    for i, filename in enumerate(filenames):
        source = by_name.get(filename.resolve()) or by_basename.get(filename.name)
        if source is None:
            raise SystemExit(f"export: {filename} is not among the frames of {data / 'transforms.json'}")
        frame = dict(source)
        if i in edited:
            image = (edited[i].clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)  # [H, W, 3]
        else:
            image = np.asarray(Image.open(filename).convert("RGB").resize((w, h), Image.BILINEAR))
        name = f"images/frame_{i:05d}.png"
        Image.fromarray(image).save(out / name)
        frame["file_path"] = name
        frames.append(frame)

    scale = w / float(meta.get("w", frames[0].get("w", w)))
    for holder in [meta] + frames:
        for key in _INTRINSICS:
            if key in holder:
                holder[key] = holder[key] * scale
        if "w" in holder:
            holder["w"], holder["h"] = w, h
    meta["frames"] = frames
    meta.pop("mask_path", None)
    meta["in2n"] = {"instruction": state["instruction"], "edited_views": len(edited), "source_run": str(run)}
    (out / "transforms.json").write_text(json.dumps(meta, indent=2))
    return out / "transforms.json"


if __name__ == "__main__":
    import tyro

    print(export_edited_dataset(tyro.cli(ExportConfig)))

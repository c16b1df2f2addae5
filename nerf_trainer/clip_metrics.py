"""CLIP direction metrics of a finished edit: the pretrained and the edited NeRF rendered along one camera path.

    python -m nerf_trainer.clip_metrics --pretrained outputs/pretrain/<scene>/nerfacto/<time>/config.yml \\
        --edited outputs/edits/<scene>/in2n-tiny/<time>/config.yml \\
        [--caption-original "a photo of a man" --caption-edited "a bronze sculpture of a man"]

The path and the frames come from nerf_trainer/camera_path.py (the video's path, frames rendered, not decoded).
Embeddings are L2-normalised before any difference (CLIP's usual practice); each figure is a mean of cosines:
  direction similarity  = mean_i cos(C(e_i) - C(o_i), T(edited caption) - T(original caption))   (needs both captions)
  direction consistency = mean_i cos(C(o_{i+1}) - C(o_i), C(e_{i+1}) - C(e_i))                    (i = 0 .. N-2)
A direction of (near) zero length has no cosine: that term is skipped and counted; with no term left the figure is
null with a reason (docs/method.md, "CLIP direction metrics"). Written to <edited run>/edit_report/metrics.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
ZERO_LENGTH = 1e-5
"""A direction between unit embeddings shorter than this has no defined cosine (identical frames or captions)."""


@dataclass
class ClipMetricsConfig:
    """CLIP direction similarity and direction consistency of an edit, on frames of both NeRFs along one path."""

    pretrained: Path
    """config.yml of the pretrained run (its training cameras make the path)."""
    edited: Path
    """config.yml of the edited (in2n) run."""
    caption_original: str | None = None
    """Caption of the original scene (direction similarity needs both captions)."""
    caption_edited: str | None = None
    """Caption of the edited scene (direction similarity needs both captions)."""
    clip_model: str = DEFAULT_CLIP_MODEL
    """CLIP model: a Hugging Face id already in the local cache, or a local folder (never downloaded here)."""
    frames: int = 30
    """Frames along the path (a closed loop through the training cameras)."""
    long_side: int = 256
    """Pixels on the longer side of each rendered view (CLIP's processor resizes and crops them)."""
    output: Path | None = None
    """metrics.json to write (None: edit_report/metrics.json in the edited run's folder)."""
    device: str = "cpu"
    """Device to render and embed on: cpu, cuda or cuda:N."""
    chunk_rays: int = 0
    """Rays per model call (0: 1024 on the CPU, the run's own eval_num_rays_per_chunk on a GPU), as the video's."""
    compile: bool = True
    """Compile the NeRFs' torch hash grids before rendering (the same pixels, faster), as the video does."""


class ClipModelMissing(FileNotFoundError):
    """The CLIP model is neither a local folder nor in the Hugging Face cache."""


def clip_model_available(model: str) -> bool:
    """True when `model` is a local folder or its config.json is in the Hugging Face cache (no network used)."""
    if Path(model).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: not available
        return False


def load_clip(model: str, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder or the HF cache, offline; ClipModelMissing when absent."""
    from transformers import CLIPModel, CLIPProcessor

    if not clip_model_available(model):
        raise ClipModelMissing(
            f"CLIP model {model!r} is not on this machine (no such folder, not in the Hugging Face cache): "
            f"get it with `hf download {model}` or pass --clip-model /path/to/folder"
        )
    clip = CLIPModel.from_pretrained(model, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
    return clip, processor


@torch.no_grad()
def image_embeddings(clip, processor, frames: list[np.ndarray], batch: int = 8) -> torch.Tensor:
    """[N, H, W, 3] uint8 frames -> [N, D] float64 L2-normalised CLIP image embeddings."""
    device = next(clip.parameters()).device
    out = []
    for start in range(0, len(frames), batch):
        pixels = processor(images=list(frames[start : start + batch]), return_tensors="pt")["pixel_values"]
        pooled = clip.vision_model(pixel_values=pixels.to(device)).pooler_output  # [b, width]
        out.append(clip.visual_projection(pooled).double().cpu())  # [b, D]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def text_embeddings(clip, processor, captions: list[str]) -> torch.Tensor:
    """Captions -> [N, D] float64 L2-normalised CLIP text embeddings."""
    device = next(clip.parameters()).device
    tokens = processor(text=captions, return_tensors="pt", padding=True)
    pooled = clip.text_model(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    ).pooler_output  # [N, width] fmt: skip
    features = clip.text_projection(pooled)  # [N, D]
    return torch.nn.functional.normalize(features.double().cpu(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, what: str) -> dict:
    """Mean of cos(a_i, b_i) over rows [N, D] where both directions have a length; the rest are counted."""
    defined = (a.norm(dim=-1) > ZERO_LENGTH) & (b.norm(dim=-1) > ZERO_LENGTH)  # [N]
    undefined = int((~defined).sum())
    result = {"value": None, "terms": int(defined.sum()), "undefined_terms": undefined}
    if undefined:
        result["note"] = f"{undefined} of {len(a)} {what} had a zero-length direction (no cosine) and were skipped"
    if defined.any():
        value = float(torch.nn.functional.cosine_similarity(a[defined], b[defined], dim=-1).mean())
        result["value"] = value if math.isfinite(value) else None
    else:
        result["skipped"] = f"every {what} had a zero-length direction: the figure is undefined"
    return result


def direction_similarity(orig: torch.Tensor, edit: torch.Tensor, text_orig: torch.Tensor, text_edit: torch.Tensor):
    """mean_i cos(C(e_i) - C(o_i), T_e - T_o) of [N, D] normalised image and [D] normalised text embeddings."""
    text_dir = (text_edit - text_orig).expand_as(orig)  # [N, D]
    return mean_cosine(edit - orig, text_dir, "frame pairs (edited - original) or the caption pair")


def direction_consistency(orig: torch.Tensor, edit: torch.Tensor) -> dict:
    """mean_i cos(C(o_{i+1}) - C(o_i), C(e_{i+1}) - C(e_i)) of [N, D] normalised embeddings, i = 0 .. N-2."""
    return mean_cosine(orig[1:] - orig[:-1], edit[1:] - edit[:-1], "consecutive-frame steps")


def compute_metrics(clip, processor, originals: list[np.ndarray], edits: list[np.ndarray],
                    caption_original: str | None = None, caption_edited: str | None = None) -> dict:  # fmt: skip
    """Both figures of frames `originals[i]` <-> `edits[i]` (same cameras); JSON-ready, no NaN."""
    orig, edit = image_embeddings(clip, processor, originals), image_embeddings(clip, processor, edits)
    if caption_original is not None and caption_edited is not None:
        text = text_embeddings(clip, processor, [caption_original, caption_edited])  # [2, D]
        similarity = direction_similarity(orig, edit, text[0], text[1])
    else:
        similarity = {"value": None, "skipped": "needs both --caption-original and --caption-edited"}
    return {
        "direction_similarity": similarity,
        "direction_consistency": direction_consistency(orig, edit),
        "frames": len(originals),
        "captions": {"original": caption_original, "edited": caption_edited},
        "embeddings": "L2-normalised before differences",
    }


def run_metrics(config: ClipMetricsConfig) -> tuple[dict, Path]:
    """Render both runs along the path (a progress bar per run), compute and write metrics.json."""
    from nerf_trainer.camera_path import render_runs

    if not 2 <= config.frames <= 10000:
        raise ValueError(f"--frames must be in [2, 10000], got {config.frames}")
    if (config.caption_original is None) != (config.caption_edited is None):
        raise ValueError("--caption-original and --caption-edited go together (give both or neither)")
    clip, processor = load_clip(config.clip_model, config.device)  # fails before any rendering when absent
    renders = render_runs(config.pretrained, config.edited, config.frames, config.long_side, config.device,
                          ("original", "edited"), config.chunk_rays, config.compile)  # fmt: skip
    metrics = compute_metrics(clip, processor, *renders, config.caption_original, config.caption_edited)
    metrics.update(clip_model=config.clip_model, pretrained=str(config.pretrained), edited=str(config.edited))
    output = config.output or config.edited.parent / "edit_report" / "metrics.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics, output


def summary(metrics: dict) -> str:
    """Two lines: each figure, or why it is missing."""
    lines = []
    for key in ("direction_similarity", "direction_consistency"):
        figure = metrics[key]
        text = f"{figure['value']:.4f}" if figure["value"] is not None else f"not computed ({figure['skipped']})"
        if figure.get("note") and figure["value"] is not None:
            text += f" ({figure['note']})"
        lines.append(f"CLIP {key.replace('_', ' ')}: {text}")
    return "\n".join(lines)


def main() -> None:
    config = tyro.cli(ClipMetricsConfig)
    try:
        metrics, output = run_metrics(config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"clip_metrics: {e}") from None
    print(summary(metrics))
    print(f"clip_metrics: {output}")


if __name__ == "__main__":
    main()

"""Before | after video of an edit: the pretrained and the edited NeRF side by side along one smooth camera path.

    python -m nerf_trainer.video --pretrained outputs/pretrain/<scene>/nerfacto/<time>/config.yml \\
        --edited outputs/edits/<scene>/in2n-tiny/<time>/config.yml --output before_after.mp4 --preview preview.webp

The path and the frames come from nerf_trainer/camera_path.py (the training cameras of the pretrained run);
the MP4 is H.264 in yuv420p (plays in browsers), encoded with PyAV (its wheel carries libx264); the preview is
an animated WebP or GIF (by its suffix) at half the size, written by Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

GAP = 4
"""White pixels between the two halves of a frame."""


@dataclass
class VideoConfig:
    """Render the pretrained and the edited NeRF along one camera path and write them side by side."""

    pretrained: Path
    """config.yml of the pretrained run (its training cameras make the path)."""
    edited: Path
    """config.yml of the edited (in2n) run."""
    output: Path = Path("before_after.mp4")
    """The MP4 to write (H.264)."""
    preview: Path | None = None
    """Also an animated preview at half size: a .webp or .gif path (None: no preview)."""
    frames: int = 60
    """Frames along the path (a closed loop through the training cameras)."""
    long_side: int = 256
    """Pixels on the longer side of each rendered view."""
    fps: int = 24
    """Frames per second of the video and the preview."""
    device: str = "cpu"
    """Device to render on: cpu, cuda or cuda:N."""
    chunk_rays: int = 0
    """Rays per model call (0: 1024 on the CPU, where small chunks stay in the cache; the run's own
    eval_num_rays_per_chunk on a GPU)."""
    compile: bool = True
    """Compile the NeRFs' torch hash grids (torch.compile) before rendering: the same pixels, 2.5x faster on the CPU
    after a few seconds of compiling; without a working compiler the frames render uncompiled, said in one line."""


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 twice -> [H', 2W + GAP', 3] uint8, white between, padded to even sides (yuv420p needs them)."""
    h, w, _ = before.shape
    width = 2 * w + GAP
    frame = np.full((h + h % 2, width + width % 2, 3), 255, dtype=np.uint8)
    frame[:h, :w] = before
    frame[:h, w + GAP : 2 * w + GAP] = after
    return frame


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """H.264 (libx264, yuv420p) MP4 of [H, W, 3] uint8 frames of even sides."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = frames[0].shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "20", "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_preview(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """Animated WebP or GIF (by `path`'s suffix) at half size, looping."""
    from PIL import Image

    suffix = path.suffix.lower()
    if suffix not in (".webp", ".gif"):
        raise ValueError(f"--preview must end in .webp or .gif, got {path}")
    images = [Image.fromarray(f).resize((f.shape[1] // 2, f.shape[0] // 2), Image.LANCZOS) for f in frames]
    extra = {"quality": 70} if suffix == ".webp" else {"optimize": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra)


def make_video(config: VideoConfig) -> Path:
    """Render both runs along the path (a progress bar per run), write the MP4 (and the preview); returns the MP4."""
    from nerf_trainer.camera_path import render_runs

    if not 2 <= config.frames <= 10000:
        raise ValueError(f"--frames must be in [2, 10000], got {config.frames}")
    halves = render_runs(config.pretrained, config.edited, config.frames, config.long_side, config.device,
                         ("before", "after"), config.chunk_rays, config.compile)  # fmt: skip
    frames = [side_by_side(b, a) for b, a in zip(*halves)]
    write_mp4(frames, config.output, config.fps)
    if config.preview is not None:
        write_preview(frames, config.preview, config.fps)
    return config.output


def main() -> None:
    config = tyro.cli(VideoConfig)
    try:
        out = make_video(config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"video: {e}") from None
    print(f"video: {out}" + (f" and {config.preview}" if config.preview else ""))


if __name__ == "__main__":
    main()

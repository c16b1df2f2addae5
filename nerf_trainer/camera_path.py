"""A smooth camera path through a scene's training cameras, and the frames two NeRFs render along it.

The path: the training cameras ordered by their angle around the cameras' centre (the way a capture
circles an object), every few of them taken as a key pose, and the poses in between interpolated
(positions linearly, rotations by slerp: nerfstudio's `get_interpolated_poses`), closing the loop.
It passes exactly through each key camera. The intrinsics are the first camera's, rescaled so that the
longer side has `long_side` pixels (a NeRF renders at any resolution).

`load_run` loads a finished nerfstudio run (its `config.yml` and newest checkpoint) for rendering only;
`render_path` renders a model along the path, in cache-sized chunks on the CPU and, when asked, with its torch
hash grids compiled (the same pixels, 2.5x faster there). The video (nerf_trainer/video.py) and the CLIP metrics both
render through these.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from nerfstudio.cameras.camera_utils import get_interpolated_poses
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import Pipeline


def key_order(camera_to_worlds: torch.Tensor) -> list[int]:
    """Indices of [N, 3, 4] camera poses sorted by the azimuth of their positions around their mean (about the
    mean of the viewing directions' "up", taken as the axis of least spread of the positions)."""
    positions = camera_to_worlds[:, :3, 3].double()  # [N, 3]
    centred = positions - positions.mean(dim=0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)  # rows: principal axes, most spread first
    a, b = centred @ vt[0], centred @ vt[1]  # [N] coordinates in the plane the cameras circle in
    return torch.argsort(torch.atan2(b, a)).tolist()


def camera_path(cameras: Cameras, num_frames: int, long_side: int, num_keys: int = 8) -> Cameras:
    """`num_frames` cameras along a closed, smooth path through `num_keys` of the training `cameras` (fewer if
    there are fewer), at `long_side` pixels on the longer side."""
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if long_side < 8:
        raise ValueError(f"long_side must be >= 8 pixels, got {long_side}")
    poses = cameras.camera_to_worlds.cpu()  # [N, 3, 4]
    order = key_order(poses)
    num_keys = max(2, min(num_keys, len(order)))
    keys = [order[round(i * len(order) / num_keys)] for i in range(num_keys)]
    key_poses = poses[keys + keys[:1]]  # [K+1, 3, 4], closed loop
    steps = math.ceil(num_frames / num_keys)
    segments = []  # between each key and the next, `steps` poses starting at the key (the next key starts the next)
    for i in range(num_keys):
        a, b = key_poses[i].numpy(), key_poses[i + 1].numpy()
        segments += get_interpolated_poses(a, b, steps=steps + 1)[:steps]
    path = torch.as_tensor(np.stack(segments[:num_frames]), dtype=torch.float32)  # [num_frames, 3, 4]
    first = cameras[0:1]
    h, w = int(first.height.item()), int(first.width.item())
    scale = long_side / max(h, w)
    n = path.shape[0]
    return Cameras(
        camera_to_worlds=path,
        fx=first.fx.cpu().expand(n, 1) * scale,
        fy=first.fy.cpu().expand(n, 1) * scale,
        cx=first.cx.cpu().expand(n, 1) * scale,
        cy=first.cy.cpu().expand(n, 1) * scale,
        width=torch.full((n, 1), round(w * scale), dtype=torch.long),
        height=torch.full((n, 1), round(h * scale), dtype=torch.long),
        camera_type=first.camera_type.cpu().expand(n, 1),
    )


def load_run(config_file: Path, device: str = "cpu") -> tuple[TrainerConfig, Pipeline]:
    """A finished nerfstudio run (its config.yml; relative paths in it are taken from the current folder, as
    nerfstudio does) loaded for rendering, with its newest checkpoint."""
    from nerf_trainer.model import rendering_model_config
    from nerf_trainer.trainer import checkpoint_safe_globals

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"no run config at {config_file} (give the config.yml of a finished nerfstudio run)")
    config = yaml.load(config_file.read_text(), Loader=yaml.Loader)
    if not isinstance(config, TrainerConfig):
        raise ValueError(f"{config_file} is not a nerfstudio run config")  # noqa: TRY004 - a bad argument, not a bug
    checkpoints = sorted(config.get_checkpoint_dir().glob("step-*.ckpt"))
    if not checkpoints:
        checkpoints = sorted((config_file.parent / "nerfstudio_models").glob("step-*.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"the run of {config_file} has no checkpoint (nerfstudio_models/step-*.ckpt)")
    if hasattr(config.pipeline, "edit_mode"):
        config.pipeline.edit_mode = "off"  # an in2n run: render only, no server
    config.pipeline.model = rendering_model_config(config.pipeline.model)  # no LPIPS: no AlexNet's weights needed
    pipeline = config.pipeline.setup(device=device, test_mode="inference")
    pipeline.eval()
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    return config, pipeline


def training_cameras(pipeline: Pipeline) -> Cameras:
    """The training cameras of a loaded run (in the run's own dataparser frame)."""
    return pipeline.datamanager.train_dataparser_outputs.cameras


CPU_CHUNK_RAYS = 1024
"""Rays per model call when rendering on the CPU: a chunk's samples stay in the cache (on the 2-core CPU a 256 px
frame of the demo's nerfacto took 28 s at nerfacto's 32768 rays a call, 10 s at 1024)."""


def compile_hash_grids(model: torch.nn.Module) -> Callable[[], None] | None:
    """torch.compile the forward of every hash grid of `model` that runs nerfstudio's torch implementation (its
    elementwise hashing, gathers and trilinear weights fuse into one loop: 2.5x faster rendering on the CPU, the
    same pixels). Returns a function that puts the uncompiled forwards back, or None when there was nothing to
    compile (tiny-cuda-nn's grids are fused already)."""
    from nerfstudio.field_components.encodings import HashEncoding

    grids = [m for m in model.modules() if isinstance(m, HashEncoding) and m.tcnn_encoding is None]
    for grid in grids:
        grid.pytorch_fwd = torch.compile(grid.pytorch_fwd)
    if not grids:
        return None

    def restore() -> None:
        for grid in grids:
            del grid.pytorch_fwd  # the instance attribute: the class's own method shows through again
        torch._dynamo.reset()  # the next model's grids start with dynamo's whole recompile allowance

    return restore


@torch.no_grad()
def render_path(
    pipeline: Pipeline,
    path: Cameras,
    on_frame: Callable[[int], None] | None = None,
    chunk_rays: int = 0,
    compile: bool = False,
) -> list[np.ndarray]:
    """[H, W, 3] uint8 frames of `pipeline`'s model along `path`; `on_frame(i)` after each. `chunk_rays`: rays per
    model call (0: CPU_CHUNK_RAYS on the CPU, the run's eval_num_rays_per_chunk elsewhere). `compile`: compile the
    torch hash grids first (compile_hash_grids); when compiling fails (no C++ compiler, say), one line says so and
    the frames render uncompiled."""
    model = pipeline.model
    if chunk_rays < 0:
        raise ValueError(f"chunk_rays must be >= 0, got {chunk_rays}")
    chunk_rays = chunk_rays or (CPU_CHUNK_RAYS if model.device.type == "cpu" else model.config.eval_num_rays_per_chunk)
    own_chunk, model.config.eval_num_rays_per_chunk = model.config.eval_num_rays_per_chunk, chunk_rays
    restore = compile_hash_grids(model) if compile else None
    frames = []
    try:
        for i in range(path.shape[0]):
            camera = path[i : i + 1].to(model.device)
            try:
                rgb = model.get_outputs_for_camera(camera)["rgb"]  # [H, W, 3] float
            except Exception as e:  # a failed compile, on the first frame only: render uncompiled
                if restore is None or i > 0:
                    raise
                restore()
                restore = None
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"render: compiling the hash grid failed ({type(e).__name__}: {reason}); rendering uncompiled")
                rgb = model.get_outputs_for_camera(camera)["rgb"]
            frames.append((rgb.clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8))
            if on_frame is not None:
                on_frame(i)
    finally:
        model.config.eval_num_rays_per_chunk = own_chunk
        if restore is not None:
            restore()
    return frames


def render_runs(pretrained: Path, edited: Path, frames: int, long_side: int, device: str, names: tuple[str, str],
                chunk_rays: int = 0, compile: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """Frames of two finished runs (config.yml each) along one path through the first's training cameras, one NeRF
    in memory at a time, a progress bar per run (`names`); the rest as render_path."""
    from tqdm import tqdm

    _, first = load_run(pretrained, device)
    path = camera_path(training_cameras(first), frames, long_side)
    halves = []
    for name, config_file in zip(names, (None, edited)):
        pipeline = first if config_file is None else load_run(config_file, device)[1]
        first = None  # the pretrained run goes once it has rendered
        with tqdm(total=frames, desc=f"rendering {name}", unit="frame") as bar:
            halves.append(render_path(pipeline, path, lambda _i: bar.update(1), chunk_rays, compile))
        del pipeline
    return halves[0], halves[1]


def default_device() -> str:
    return os.environ.get("IN2N_RENDER_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")

"""The in2n data manager: all training images in one buffer that edits are swapped into.

nerfstudio's VanillaDataManager re-reads its cached batch every step; here the
batch is taken once, sorted so that buffer row i holds camera i, and kept as
`images` ([N, H, W, 3] float32). The captured images stay aside, unchanged, in
`original_images`: they are the image conditioning of every edit. Rays are
sampled from the current buffer at every step, so supervision mixes edited
and not yet edited views.

Before nerfstudio reads the scene, `check_scene` looks at it: transforms.json
readable and with frames, each with a 4x4 pose and the intrinsics nerfstudio
requires, every image present, readable and of one size. A problem is a
`SceneError` naming the file, which `ns-train` prints as one line (and `make run`,
through `require_scene`, before it pretrains).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image


@dataclass
class In2nDataManagerConfig(VanillaDataManagerConfig):
    """Training images in a swappable buffer, originals kept aside."""

    _target: type = field(default_factory=lambda: In2nDataManager)
    """Target class to instantiate."""
    dataparser: NerfstudioDataParserConfig = field(default_factory=NerfstudioDataParserConfig)
    """Reads the scene (nerfstudio format: transforms.json and images)."""


class SceneError(ValueError):
    """A scene nerfstudio cannot train on; the message names the file and the problem, in one line."""


INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
"""Camera intrinsics nerfstudio's parser requires, each at top level (all frames) or in every frame."""
DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
"""Optional distortion coefficients (0 when absent); where given, they must be numbers."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _intrinsic_problem(key: str, value) -> str | None:
    """Why `value` cannot be intrinsic `key` (None when it can): focal lengths > 0, sizes whole numbers > 0."""
    if not _is_number(value):
        return f"must be a finite number, got {_brief(value)}"
    if key in ("fl_x", "fl_y", "w", "h") and value <= 0:
        return f"must be > 0, got {value}"
    if key in ("w", "h") and value != int(value):
        return f"must be a whole number of pixels, got {value}"
    return None


def _is_pose(matrix) -> bool:
    """Whether `matrix` is a 4x4 list of lists of finite numbers (nerfstudio 1.1.5 needs 4x4: a 3x4 fails in
    its pose centring)."""
    return (
        isinstance(matrix, list) and len(matrix) == 4
        and all(isinstance(row, list) and len(row) == 4 and all(_is_number(x) for x in row) for row in matrix)
    )  # fmt: skip


def _brief(value) -> str:
    """A short description of a JSON value for an error line."""
    if isinstance(value, list):
        rows = [len(v) if isinstance(v, list) else type(v).__name__ for v in value[:6]]
        return f"a list of {len(value)} ({', '.join(map(str, rows))}{', ...' if len(value) > 6 else ''})"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_cameras(meta_path: Path, meta: dict) -> None:
    """SceneError unless nerfstudio's parser can build every frame's camera: a known camera_model, a 4x4 pose,
    each required intrinsic at top level or in the frame, every intrinsic and distortion coefficient a number."""
    camera_model = meta.get("camera_model", "OPENCV")  # absent: a perspective camera
    if not isinstance(camera_model, str) or camera_model not in CAMERA_MODEL_TO_TYPE:
        raise SceneError(
            f'{meta_path}: unknown "camera_model" {_brief(camera_model)} (one of {", ".join(CAMERA_MODEL_TO_TYPE)})'
        )
    for key in INTRINSICS + DISTORTION:  # at top level they hold for every frame
        problem = _intrinsic_problem(key, meta[key]) if key in meta else None
        if problem:
            raise SceneError(f'{meta_path}: "{key}" {problem}')
    # Like nerfstudio: any distortion key at top level means the frames' are not read.
    distortion_fixed = any(key in meta for key in DISTORTION + ("distortion_params",))
    for k, frame in enumerate(meta["frames"]):
        where = f"{meta_path}: frame {k} ({frame['file_path']})"  # check_scene saw a dict with both keys
        if not _is_pose(frame["transform_matrix"]):
            raise SceneError(f"{where}: \"transform_matrix\" must be 4x4 finite numbers (4 rows of 4), "
                             f"got {_brief(frame['transform_matrix'])}")  # fmt: skip
        for key in INTRINSICS + (() if distortion_fixed else DISTORTION):
            if key in meta:
                continue
            if key not in frame:
                if key in INTRINSICS:
                    raise SceneError(f'{where}: no "{key}" (nerfstudio needs it at top level or in every frame)')
                continue
            problem = _intrinsic_problem(key, frame[key])
            if problem:
                raise SceneError(f'{where}: "{key}" {problem}')


def check_scene(data: Path, images: bool = True) -> tuple[int, tuple[int, int] | None]:
    """Check a nerfstudio scene (a folder with transforms.json, or the .json itself) before it is parsed.

    Returns (number of frames, (width, height) of the images, None when `images` is False). Raises
    SceneError, naming the file, when transforms.json is missing or malformed or lists no frames, when a frame's
    transform_matrix is not 4x4 finite numbers, when an intrinsic nerfstudio requires (fl_x, fl_y, cx, cy, w,
    h) is neither at top level nor in the frame, or an intrinsic is not a number, or (with
    `images`) an image is missing, unreadable or of another size than the first (in2n trains on one buffer
    of equally sized images).
    """
    data = Path(data)
    meta_path, base = (data, data.parent) if data.suffix == ".json" else (data / "transforms.json", data)
    if not meta_path.is_file():
        raise SceneError(f"{meta_path}: no such file (a nerfstudio scene needs transforms.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise SceneError(f"{meta_path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SceneError(f"{meta_path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise SceneError(f'{meta_path}: no frames ("frames" must be a non-empty list)')
    for k, frame in enumerate(frames):
        if (
            not isinstance(frame, dict)
            or not isinstance(frame.get("file_path"), str)
            or "transform_matrix" not in frame
        ):
            raise SceneError(f'{meta_path}: frame {k} needs a "file_path" and a "transform_matrix"')
    _check_cameras(meta_path, meta)
    first: tuple[Path, tuple[int, int]] | None = None
    for k, frame in enumerate(frames):
        image = base / frame["file_path"]
        if not images:
            continue
        if not image.is_file():
            raise SceneError(f"{image}: image missing (frame {k} of {meta_path})")
        try:
            with Image.open(image) as im:
                im.load()  # decodes it all: a truncated file fails here, not in the middle of training
                size = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds for files it cannot decode
            raise SceneError(f"{image}: unreadable image ({e})") from None
        if first is None:
            first = (image, size)
        elif size != first[1]:
            raise SceneError(
                f"{image}: {size[0]}x{size[1]} pixels, but {first[0].name} is {first[1][0]}x{first[1][1]}; "
                "in2n needs all images at one size"
            )
    return len(frames), first[1] if first is not None else None


def require_scene(data: Path, who: str) -> None:
    """`check_scene(data)`, or SystemExit with its one line prefixed by `who` (a command's name): what `make run`
    (in2n_demo/run.py) runs before pretraining, so a bad scene is one line there too, not nerfstudio's traceback."""
    try:
        check_scene(Path(data))
    except SceneError as e:
        raise SystemExit(f"{who}: {e}") from None


class In2nDataManager(VanillaDataManager):
    """Samples rays from a buffer of training images that edits replace, view by view."""

    config: In2nDataManagerConfig

    def __init__(
        self, config: In2nDataManagerConfig, device="cpu", test_mode="val", world_size=1, local_rank=0, **kwargs
    ):
        data = config.data if config.data is not None else config.dataparser.data
        if data is None or not Path(data).exists():
            raise SceneError(f"{data}: no such scene folder (--data)")
        check_scene(Path(data), images=test_mode != "inference")  # inference (ns-render, ...) opens no image
        super().__init__(config, device, test_mode, world_size, local_rank, **kwargs)

    def setup_train(self) -> None:
        super().setup_train()
        batch = next(self.iter_train_image_dataloader)
        if not isinstance(batch["image"], torch.Tensor):
            raise ValueError("in2n needs all training images at one resolution (got images of several sizes)")  # noqa: TRY004 - a scene error, reported as the other scene errors
        order = torch.argsort(batch["image_idx"])
        self.image_batch: dict[str, torch.Tensor] = {
            "image": batch["image"][order][..., :3].contiguous(),  # [N, H, W, 3] float32 in [0, 1]
            "image_idx": batch["image_idx"][order],  # [N], equal to arange(N)
        }
        self.original_images = self.image_batch["image"].clone()  # [N, H, W, 3], never written

    @property
    def images(self) -> torch.Tensor:
        """The current training images, [N, H, W, 3] float32; row i is camera i."""
        return self.image_batch["image"]

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    def swap_image(self, view: int, image: torch.Tensor) -> None:
        """Replace view `view`'s training image with `image` ([H, W, 3] float in [0, 1]), in one copy."""
        if image.shape != self.images.shape[1:]:
            raise ValueError(
                f"image for view {view} has shape {tuple(image.shape)}, expected {tuple(self.images.shape[1:])}"
            )
        self.images[view].copy_(image)

    def next_train(self, step: int) -> tuple[RayBundle, dict]:
        self.train_count += 1
        assert self.train_pixel_sampler is not None
        batch = self.train_pixel_sampler.sample(self.image_batch)
        ray_bundle = self.train_ray_generator(batch["indices"])
        return ray_bundle, batch

"""The bundled demo scene: a procedural still life, ray-traced, in nerfstudio format.

Three spheres and a box on a checkered disc, under a sun and a sky, seen by
cameras on a ring around it. Everything is analytic, so the scene is exact,
offline and fast to make (a few seconds for 32 views at 64x64). Writes
`transforms.json` (OpenGL camera convention, as nerfstudio expects) and
`images/frame_XXXXX.png`.

    python -m in2n_demo.demo_scene --output data/demo --num-views 32 --size 64
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_SUN = np.array([0.4, -0.3, 0.85]) / np.linalg.norm([0.4, -0.3, 0.85])
# (center xyz, radius, rgb)
_SPHERES = (
    ((0.0, 0.0, 0.45), 0.45, (0.85, 0.25, 0.2)),
    ((0.75, 0.35, 0.25), 0.25, (0.2, 0.55, 0.85)),
    ((-0.55, 0.6, 0.3), 0.3, (0.95, 0.8, 0.25)),
)
# (min corner, max corner, rgb)
_BOX = ((-0.75, -0.85, 0.0), (-0.25, -0.35, 0.5), (0.3, 0.75, 0.35))
_DISC_RADIUS = 1.6


@dataclass
class DemoSceneConfig:
    """How to make the demo scene."""

    output: Path = Path("data/demo")
    """Folder to write transforms.json and images/ into."""
    num_views: int = 32
    """Number of camera views on the ring (at least 24 for a useful edit)."""
    size: int = 64
    """Image width and height in pixels."""
    radius: float = 3.2
    """Distance of the cameras from the scene centre."""


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world 4x4 (OpenGL: camera looks down -z, y is up)."""
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


def camera_poses(num_views: int, radius: float) -> np.ndarray:
    """[N, 4, 4] camera-to-world matrices on a ring, elevation alternating a little."""
    poses = []
    for i in range(num_views):
        azimuth = 2 * math.pi * i / num_views
        elevation = math.radians(25 + 10 * math.sin(3 * azimuth))
        eye = radius * np.array(
            [math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation), math.sin(elevation)]
        )
        poses.append(_look_at(eye, np.array([0.0, 0.0, 0.3])))
    return np.stack(poses)


def _hit_sphere(o: np.ndarray, d: np.ndarray, center, radius) -> np.ndarray:
    """Distance along each ray [R] to the sphere, inf where missed."""
    oc = o - np.asarray(center)
    b = np.einsum("rk,rk->r", oc, d)
    c = np.einsum("rk,rk->r", oc, oc) - radius**2
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc > 0) & (t > 1e-4), t, np.inf)


def _hit_box(o: np.ndarray, d: np.ndarray, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Distance [R] to an axis-aligned box and the hit normals [R, 3]."""
    inv = 1.0 / np.where(np.abs(d) < 1e-9, 1e-9, d)
    t0, t1 = (np.asarray(lo) - o) * inv, (np.asarray(hi) - o) * inv
    tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
    near, far = tmin.max(axis=1), tmax.min(axis=1)
    t = np.where((near < far) & (near > 1e-4), near, np.inf)
    axis = tmin.argmax(axis=1)
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return t, normal


def _trace(o: np.ndarray, d: np.ndarray, shadows: bool = True) -> np.ndarray:
    """Colour [R, 3] of rays with origins o [R, 3] and unit directions d [R, 3]."""
    n_rays = len(o)
    best = np.full(n_rays, np.inf)
    normal = np.zeros((n_rays, 3))
    albedo = np.zeros((n_rays, 3))
    for center, radius, rgb in _SPHERES:
        t = _hit_sphere(o, d, center, radius)
        hit = t < best
        best[hit] = t[hit]
        p = o[hit] + t[hit, None] * d[hit]
        normal[hit] = (p - np.asarray(center)) / radius
        albedo[hit] = rgb
    t, box_normal = _hit_box(o, d, _BOX[0], _BOX[1])
    hit = t < best
    best[hit], normal[hit], albedo[hit] = t[hit], box_normal[hit], _BOX[2]
    t = np.where(np.abs(d[:, 2]) > 1e-9, -o[:, 2] / np.where(np.abs(d[:, 2]) > 1e-9, d[:, 2], 1.0), np.inf)
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    hit = (t > 1e-4) & (t < best) & (np.hypot(p[:, 0], p[:, 1]) < _DISC_RADIUS)
    checker = (np.floor(p[:, 0] * 2.5) + np.floor(p[:, 1] * 2.5)) % 2
    best[hit], normal[hit] = t[hit], (0.0, 0.0, 1.0)
    albedo[hit] = np.where(checker[hit, None] > 0, 0.85, 0.3) * np.array([0.95, 0.92, 0.85])

    sky = np.clip(0.55 + 0.45 * d[:, 2:3], 0, 1) * np.array([0.55, 0.7, 0.95]) + 0.1
    surface = np.isfinite(best)
    lambert = np.clip(np.einsum("rk,k->r", normal, _SUN), 0.0, 1.0)
    if shadows and surface.any():
        p = o[surface] + best[surface, None] * d[surface] + 1e-3 * normal[surface]
        occluded = np.isfinite(_occluder_distance(p, np.broadcast_to(_SUN, p.shape).copy()))
        lambert[np.flatnonzero(surface)[occluded]] *= 0.15
    shade = 0.25 + 0.75 * lambert
    return np.clip(np.where(surface[:, None], albedo * shade[:, None], sky), 0.0, 1.0)


def _occluder_distance(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    best = np.full(len(o), np.inf)
    for center, radius, _ in _SPHERES:
        best = np.minimum(best, _hit_sphere(o, d, center, radius))
    return np.minimum(best, _hit_box(o, d, _BOX[0], _BOX[1])[0])


def render_view(c2w: np.ndarray, size: int, focal: float) -> np.ndarray:
    """Ray-trace one view: [size, size, 3] float in [0, 1]."""
    j, i = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    dirs_cam = np.stack([(i - size / 2) / focal, -(j - size / 2) / focal, -np.ones_like(i)], axis=-1)
    dirs = dirs_cam.reshape(-1, 3) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape).copy()
    return _trace(origins, dirs).reshape(size, size, 3)


def make_demo_scene(config: DemoSceneConfig) -> Path:
    """Write the scene; returns the path of transforms.json."""
    if config.num_views < 1:
        raise ValueError(f"num_views must be positive, got {config.num_views}")
    if config.size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {config.size}")
    out = Path(config.output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    focal = 1.1 * config.size  # about 49 degrees of field of view
    frames = []
    for k, c2w in enumerate(camera_poses(config.num_views, config.radius)):
        rgb = render_view(c2w, config.size, focal)
        name = f"images/frame_{k + 1:05d}.png"
        Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(out / name)
        frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
    meta = {
        "camera_model": "OPENCV",
        "fl_x": focal,
        "fl_y": focal,
        "cx": config.size / 2,
        "cy": config.size / 2,
        "w": config.size,
        "h": config.size,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
    }
    tmp = out / "transforms.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / "transforms.json")
    return out / "transforms.json"


if __name__ == "__main__":
    import tyro

    print(make_demo_scene(tyro.cli(DemoSceneConfig)))

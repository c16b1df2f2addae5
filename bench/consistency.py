"""3D consistency (issue 5): does the Iterative Dataset Update make per-view edits agree?

A diffusion model edits each view differently; Instruct-NeRF2NeRF's claim is
that the Iterative Dataset Update (IDU) makes the edits converge to one
3D-consistent result, because every edit starts from a noised render of the
NeRF and diffusion is mode-seeking. This reproduces the claim offline, with
the `stochastic` backend (diffusion_server/backends/stochastic.py: K colour
looks, one picked at random per call, with a preference for the look the
noised render already has), hosted in-process on a gRPC server:

- (a) IDU: `ns-train in2n-tiny --pipeline.edit-rate 1 --pipeline.max-in-flight 2`, N steps;
- (b) edit every image once, then train on them: the same with `--pipeline.max-edits-per-view 1`.

    python bench/consistency.py --steps 400 --num-views 24 --size 64

The metric, on the final renders of the tracked views (`--sheet-views`; each
relative to the original image of its view, so that it does not depend on what
a view shows): the colour statistics of a render are its per-channel log gain
s_v = log(mean_c(render_v) / mean_c(original_v)), the same statistic the
backend's looks are defined by (look k is s = log g_k exactly). Then
- nearest look of a view: argmin_k ||s_v - log g_k||;
- agreement: fraction of views whose nearest look is the majority's;
- spread: sqrt(sum_c var_v(s_v,c)), the RMS distance of the views' statistics
  from their mean (0 = every view got the same colour change);
- distance to one look: min_k mean_v ||s_v - log g_k|| (0 = every view is
  exactly one and the same target look); also divided by the distance between
  two looks (`separation`), so 1.0 means "as far as another look".
The same figures are given for the pretrained renders (before) and for the
final training images (the edits as trained on).

Prints a markdown table and writes bench/results/consistency.json. A benchmark,
not a test: nothing here asserts (tests/test_consistency.py does).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._server import cpu_model
from diffusion_server.backends.stochastic import StochasticLookBackend, color_stats
from testing_support import InProcessServer

MODES = {
    "idu": ("(a) Iterative Dataset Update", []),
    "once": ("(b) edit every image once", ["--pipeline.max-edits-per-view", "1"]),
    "idu-workers": ("(a) with a render worker", ["--pipeline.render-devices", "cpu"]),
}


@dataclass
class ConsistencyConfig:
    """IDU against editing every view once, with a stochastic, mode-seeking editor."""

    steps: int = 400
    """in2n training steps of each run."""
    num_views: int = 24
    """Views of the demo scene."""
    size: int = 64
    """Image side of the demo scene, in pixels."""
    pretrain_steps: int = 300
    """nerfacto steps of the pretrained model (skipped when the workdir already holds one)."""
    rays: int = 512
    """Training rays per batch (pretraining and in2n)."""
    sheet_views: int = 12
    """Views rendered at the end of each run and measured (spread evenly over the views)."""
    temperature: float = 0.25
    """Softmax temperature of the backend's look choice (smaller: follows the render more)."""
    seen_pixels: int | None = 4096
    """Size of the latent through which the backend sees the noised render (None: the render's own pixels)."""
    seed: int = 0
    """Edit seed (order and edits) of both runs."""
    modes: tuple[str, ...] = ("idu", "once", "idu-workers")
    """Runs to make: idu, once, idu-workers (idu with the views rendered by a render worker process on the CPU, from
    a copy of the NeRF refreshed every 10 steps: stale renders must not cost convergence)."""
    workdir: Path = Path(tempfile.gettempdir()) / "in2n_bench_consistency"
    """Scratch folder (scene, pretrained model, runs)."""
    results: Path | None = REPO / "bench" / "results" / "consistency.json"
    """Where to write the figures (None: nowhere)."""


# -- the metric ---------------------------------------------------------------------------------


def look_separation(look_stats: np.ndarray) -> float:
    """Smallest distance between two looks' statistics."""
    d = np.linalg.norm(look_stats[:, None, :] - look_stats[None, :, :], axis=-1)
    return float(d[~np.eye(len(look_stats), dtype=bool)].min())


def consistency_metrics(images: np.ndarray, originals: np.ndarray, look_stats: np.ndarray) -> dict[str, object]:
    """Consistency of per-view images ([V, H, W, 3], any scale shared with `originals`) against K looks ([K, 3]).

    See the module docstring for the definitions.
    """
    images = np.asarray(images, dtype=np.float64)
    originals = np.asarray(originals, dtype=np.float64)
    if images.max() > 1.0 or originals.max() > 1.0:
        images, originals = images / 255.0, originals / 255.0
    stats = color_stats(images, originals)  # [V, 3]
    dist = np.linalg.norm(stats[:, None, :] - look_stats[None, :, :], axis=-1)  # [V, K]
    nearest = dist.argmin(axis=1)
    counts = np.bincount(nearest, minlength=len(look_stats))
    majority = int(counts.argmax())
    mean_dist = dist.mean(axis=0)  # [K]
    best = int(mean_dist.argmin())
    separation = look_separation(look_stats)
    spread = float(np.sqrt(stats.var(axis=0).sum()))
    return {
        "views": len(stats),
        "agreement": float(counts[majority] / len(stats)),
        "majority_look": majority,
        "look_counts": counts.tolist(),
        "spread": spread,
        "spread_rel": spread / separation,
        "distance_to_one_look": float(mean_dist[best]),
        "distance_rel": float(mean_dist[best] / separation),
        "nearest_single_look": best,
        "separation": separation,
        "stats": stats.round(4).tolist(),
    }


def load_pngs(paths: Sequence[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def measure_run(run_dir: Path, look_stats: np.ndarray) -> dict[str, dict[str, object]]:
    """Metrics of one in2n run folder: final renders (after), pretrained renders (before), training images."""
    report = Path(run_dir) / "edit_report"
    snapshot = np.load(report / "training_images.npz")
    originals = snapshot["originals"]
    out: dict[str, dict[str, object]] = {}
    for when in ("after", "before"):
        paths = sorted(report.glob(f"view_*_{when}.png"))
        if not paths:
            raise FileNotFoundError(f"no view_*_{when}.png in {report}")
        views = [int(p.name.split("_")[1]) for p in paths]
        out[when] = consistency_metrics(load_pngs(paths), originals[views], look_stats)
        out[when]["view_ids"] = views
    out["training_images"] = consistency_metrics(snapshot["images"], originals, look_stats)
    out["training_images"]["edits_per_view"] = snapshot["edits_per_view"].tolist()
    stats = json.loads((report / "edit_stats.json").read_text())  # the counters: edits, rendering, the lag
    out["stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    return out


# -- the runs ------------------------------------------------------------------------------------


def in2n_command(ns_train: str, load_dir: Path, scene: Path, out: Path, name: str, port: int, steps: int, rays: int,
                 sheet_views: int, seed: int, extra: Sequence[str] = (), quiet: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The `ns-train in2n-tiny` command line of one run (IDU flags; `extra` adds the mode's)."""
    return [ns_train, "in2n-tiny", "--load-dir", str(load_dir), "--data", str(scene), "--output-dir", str(out),
            "--experiment-name", "consistency", "--timestamp", name, "--max-num-iterations", str(steps),
            "--steps-per-save", "1000000", "--pipeline.datamanager.train-num-rays-per-batch", str(rays),
            "--pipeline.edit-server", f"127.0.0.1:{port}", "--pipeline.instruction", "give it a colour look",
            "--pipeline.edit-rate", "1", "--pipeline.max-in-flight", "2", "--pipeline.edit-seed", str(seed),
            "--pipeline.sheet-views", str(sheet_views), "--pipeline.log-every", "0", *quiet, *extra]  # fmt: skip


def run_dir_of(out: Path, name: str) -> Path:
    return Path(out) / "consistency" / "in2n-tiny" / name


def machine() -> dict[str, object]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def table(results: dict[str, dict[str, dict[str, object]]]) -> str:
    rows = ["| run | images | agreement (majority look) | spread (rel.) | distance to one look (rel.) | looks per view (R/G/B) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, per in results.items():
        label = MODES[mode][0] if mode in MODES else mode
        for when, title in (
            ("before", "pretrained renders"),
            ("after", "final renders"),
            ("training_images", "training images"),
        ):
            m = per[when]
            rows.append(f"| {label} | {title} | {m['agreement']:.2f} ({m['majority_look']}) | {m['spread']:.3f} ({m['spread_rel']:.2f}) | "
                        f"{m['distance_to_one_look']:.3f} ({m['distance_rel']:.2f}) | {'/'.join(map(str, m['look_counts']))} |")  # fmt: skip
    return "\n".join(rows)


def main(cfg: ConsistencyConfig) -> dict[str, object]:
    from in2n_demo.demo_scene import DemoSceneConfig, make_demo_scene
    from in2n_demo.run import NS_TRAIN, SMALL_NERFACTO, ensure_lpips_backbone

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout's code
    env.setdefault("OMP_NUM_THREADS", "1")
    ensure_lpips_backbone(env, cfg.workdir)
    quiet = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-eval-image", "1000000",
             "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000"]  # fmt: skip
    scene = cfg.workdir / f"scene-{cfg.num_views}x{cfg.size}"
    if not (scene / "transforms.json").exists():
        make_demo_scene(DemoSceneConfig(output=scene, num_views=cfg.num_views, size=cfg.size))
    pre = cfg.workdir / f"pre-{cfg.num_views}x{cfg.size}-{cfg.pretrain_steps}"
    load_dir = pre / "consistency" / "nerfacto" / "pre" / "nerfstudio_models"
    if not list(load_dir.glob("*.ckpt")):
        t0 = time.perf_counter()
        proc = subprocess.run([NS_TRAIN, "nerfacto", "--data", str(scene), "--output-dir", str(pre), "--experiment-name",
                               "consistency", "--timestamp", "pre", "--max-num-iterations", str(cfg.pretrain_steps),
                               "--steps-per-save", str(cfg.pretrain_steps), "--pipeline.datamanager.train-num-rays-per-batch",
                               str(cfg.rays), *quiet, *SMALL_NERFACTO], env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"pretraining failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        print(f"pretrained nerfacto ({cfg.pretrain_steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)

    backend = StochasticLookBackend(temperature=cfg.temperature, seed=cfg.seed, seen_pixels=cfg.seen_pixels)
    server = InProcessServer(backend, device="cpu")  # a gRPC diffusion server in this process, on a free port
    port = server.port
    out = cfg.workdir / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, dict[str, object]]] = {}
    seconds: dict[str, float] = {}
    commands: dict[str, str] = {}
    try:
        for mode in cfg.modes:
            label, extra = MODES[mode]
            name = f"{mode}-{stamp}"
            cmd = in2n_command(NS_TRAIN, load_dir, scene, out, name, port, cfg.steps, cfg.rays, cfg.sheet_views, cfg.seed,
                               extra, quiet)  # fmt: skip
            commands[mode] = " ".join(cmd[1:])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds[mode] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[mode] = measure_run(run_dir_of(out, name), backend.look_stats)
            a = results[mode]["after"]
            print(f"{label}: {seconds[mode]:.0f} s, agreement {a['agreement']:.2f}, spread {a['spread']:.3f}, "
                  f"distance to one look {a['distance_to_one_look']:.3f}, edits {sum(results[mode]['training_images']['edits_per_view'])}",
                  flush=True)  # fmt: skip
    finally:
        server.close()

    info = machine()
    print(f"\nmachine: {info['nproc']} CPUs, {info['cpu']}; demo scene {cfg.num_views} views {cfg.size}x{cfg.size}, "
          f"{cfg.steps} steps, {cfg.sheet_views} views measured, backend K={backend.num_looks} looks "
          f"({', '.join(backend.names)}), temperature {cfg.temperature:g}, seen pixels {cfg.seen_pixels}, seed {cfg.seed}\n")  # fmt: skip
    print(table(results))
    doc = {
        "machine": info,
        "config": {k: str(v).replace(f"{REPO}/", "") for k, v in vars(cfg).items()},  # no path outside the repo
        "backend": backend.info().model,
        "looks": {
            "names": backend.names,
            "gains": backend.gains.tolist(),
            "stats": backend.look_stats.round(4).tolist(),
        },
        "seconds": seconds,
        "commands": commands,
        "results": results,
    }
    if cfg.results is not None:
        cfg.results.parent.mkdir(parents=True, exist_ok=True)
        cfg.results.write_text(json.dumps(doc, indent=2))
        print(f"\nwritten to {cfg.results}")
    return doc


if __name__ == "__main__":
    main(tyro.cli(ConsistencyConfig))

"""Edits per second over 1, 2 and 4 edit servers, and the trainer's speed with each (issue 11).

`make run EDIT_DEVICE=a,b,...` starts one server per device and the trainer spreads its edits over
them. Here every server is `identity --delay-ms D` (a fixed cost per edit, a sleep: no CPU), so
edits/s measures how well the trainer keeps N devices busy, and steps/s against a run without
editing (`--pipeline.edit-mode off`) what that costs the training. The same `ns-train in2n-tiny` job
(tiny nerfacto on a 32x32 demo scene, one pretraining shared) runs interleaved: off, 1, 2, 4, off,
1, 2, 4, ... for --rounds rounds; ratios are taken within a round and reported as median [min, max].

    python bench/multi_server.py --rounds 3 --steps 400 --delay-ms 200

With --render-workers N the views to edit are rendered by N render worker processes
(--pipeline.render-devices cpu,...; -1: one per server, as make run) and with --pin the trainer runs on
one core (taskset) and the workers and servers on the other, the runs without editing pinned alike.

Prints a markdown table (for BENCHMARKS.md) and writes bench/results/multi_server.json.
A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _server import BenchServer, machine

from in2n_demo.run import NS_TRAIN, ensure_lpips_backbone
from testing_support import TINY_NERFACTO, demo_scene_and_pretrained, read_edit_report

QUIET = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-save", "1000000",
         "--steps-per-eval-image", "1000000", "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000"]  # fmt: skip


@dataclass
class BenchConfig:
    """Edits/s and training speed with 0 (no editing), 1, 2 and 4 edit servers."""

    servers: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Numbers of edit servers to measure (each against no editing)."""
    rounds: int = 3
    """Interleaved rounds (off, then each server count, per round)."""
    steps: int = 400
    """Training steps per run."""
    warmup: int = 10
    """Steps left out of the step rate at the start of each run."""
    delay_ms: float = 200.0
    """Fixed cost of an edit on every server (identity --delay-ms)."""
    max_in_flight: int = 2
    """Edits outstanding per server (--pipeline.max-in-flight)."""
    render_chunk_rays: int = 4096
    """Rays of the next view per model call (4096: a whole 32x32 view in one chunk; 128: eight chunks, which the
    trainer's render pace spreads over steps, as a 512x512 view on a GPU is)."""
    max_chunks_per_step: int = 0
    """--pipeline.render-max-chunks-per-step (0: the adaptive render pace; 1: one chunk a step)."""
    render_workers: int = 0
    """Render worker processes on the CPU (--pipeline.render-devices cpu,...): 0 none (the trainer renders), -1 one
    per server (as make run), N: N for every server count."""
    render_sync_steps: int = 10
    """--pipeline.render-sync-steps (with workers)."""
    pin: bool = False
    """Pin the trainer to CPU `trainer_cpu` (taskset) and its render workers and the servers to the others, also in
    the runs without editing."""
    trainer_cpu: int = 0
    """The trainer's core when pinned."""
    results: str = "multi_server.json"
    """File name of the figures, under bench/results/."""
    workdir: Path = Path(tempfile.gettempdir()) / "in2n_bench_multi_server"
    """Scratch folder (scene, pretrained model, runs)."""


def pretrain(cfg: BenchConfig, env: dict) -> tuple:
    return demo_scene_and_pretrained(cfg.workdir, NS_TRAIN, env, num_views=24, size=32, steps=150, rays=256,
                                     flags=[*QUIET, *TINY_NERFACTO])  # fmt: skip


def other_cpus(cfg: BenchConfig) -> set[int]:
    """The cores left to render workers and servers when pinned (all but the trainer's)."""
    return set(os.sched_getaffinity(0)) - {cfg.trainer_cpu} or {cfg.trainer_cpu}


def run_pinned(cmd: list[str], cfg: BenchConfig, env: dict) -> subprocess.CompletedProcess:
    """Run `cmd`; pinned: on the trainer's core, each child it starts (the render workers) moved to the others."""
    if not cfg.pin:
        return subprocess.run(cmd, env=env, capture_output=True, text=True)
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cfg.trainer_cpu), *cmd], env=env, stdout=out, stderr=err, text=True
        )
        moved: set[int] = set()
        while proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if child.pid not in moved:
                        os.sched_setaffinity(child.pid, other_cpus(cfg))
                        moved.add(child.pid)
            except (psutil.Error, ProcessLookupError):
                pass
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def run_once(cfg: BenchConfig, scene: Path, load_dir: Path, addresses: list[str], name: str, env: dict) -> dict:
    out = cfg.workdir / "runs"
    mode = ["--pipeline.edit-mode", "off"] if not addresses else []
    workers = len(addresses) if cfg.render_workers < 0 else cfg.render_workers
    if addresses and workers > 0:
        mode += ["--pipeline.render-devices", ",".join(["cpu"] * workers),
                 "--pipeline.render-sync-steps", str(cfg.render_sync_steps)]  # fmt: skip
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(load_dir), "--data", str(scene), "--output-dir", str(out),
           "--experiment-name", "bench", "--timestamp", name, "--max-num-iterations", str(cfg.steps),
           "--pipeline.datamanager.train-num-rays-per-batch", "256",
           "--pipeline.edit-server", ",".join(addresses or ["127.0.0.1:1"]), "--pipeline.instruction", "make it sepia",
           "--pipeline.edit-rate", "1", "--pipeline.max-in-flight", str(cfg.max_in_flight),
           "--pipeline.render-chunk-rays", str(cfg.render_chunk_rays),
           "--pipeline.render-max-chunks-per-step", str(cfg.max_chunks_per_step), "--pipeline.log-every", "0",
           *mode, *QUIET]  # fmt: skip
    proc = run_pinned(cmd, cfg, env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = out / "bench" / "in2n-tiny" / name / "edit_report"
    times, stats = read_edit_report(report)
    return {
        "steps_per_s": float(1.0 / times[cfg.warmup :].mean()),
        "edits_per_s": stats.get("edits_applied", 0) / float(times.sum()),
        "edits_applied": stats.get("edits_applied", 0),
        "peak_in_flight": stats.get("edits_in_flight_peak", 0),
        "render_share": stats.get("render_share", 0.0),
        "render_chunks_per_step": stats.get("render_chunks_per_step", 0),
        "render_steps": stats.get("render_steps", 0),
        "render_lag_median": stats.get("render_lag_median", 0.0),
        "render_lag_max": stats.get("render_lag_max", 0),
        "render_sync_ms": stats.get("render_sync_ms", 0.0),
        "render_sync_max_ms": stats.get("render_sync_max_ms", 0.0),
        "step_ms": float(1000 * times[cfg.warmup :].mean()),
        "worker_peak_rss_mib": [round(w["peak_rss_bytes"] / 2**20) for w in stats.get("render_workers", [])],
        "per_server": [row["edits_applied"] for row in stats.get("servers", [])] if addresses else [],
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(cfg: BenchConfig) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers (finally) when killed
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout's code
    env.setdefault("OMP_NUM_THREADS", "1")
    ensure_lpips_backbone(env, cfg.workdir)
    started = time.monotonic()
    scene, load_dir = pretrain(cfg, env)
    servers = [BenchServer("identity", ["--delay-ms", f"{cfg.delay_ms:g}"]) for _ in range(max(cfg.servers))]
    if cfg.pin:
        for server in servers:
            os.sched_setaffinity(server.proc.pid, other_cpus(cfg))
    results: dict[int, list[dict]] = {n: [] for n in [0, *cfg.servers]}
    try:
        for r in range(cfg.rounds):
            for n in [0, *cfg.servers]:
                result = run_once(cfg, scene, load_dir, [s.address for s in servers[:n]], f"r{r}-n{n}", env)
                results[n].append(result)
                print(f"round {r} servers {n}: {result}", flush=True)
            report(cfg, results, r + 1, time.monotonic() - started)  # after every round: a cut-short run still reports
    finally:
        for server in servers:
            server.close()


def report(cfg: BenchConfig, results: dict[int, list[dict]], rounds: int, elapsed_s: float) -> None:
    """Print the table over the first `rounds` rounds and write bench/results/<cfg.results>."""
    rows = []
    for n in cfg.servers:
        edits_ratio = [results[n][r]["edits_per_s"] / (results[cfg.servers[0]][r]["edits_per_s"] or float("nan"))
                       for r in range(rounds)]  # fmt: skip
        speed_ratio = [results[n][r]["steps_per_s"] / results[0][r]["steps_per_s"] for r in range(rounds)]
        rows.append({
            "servers": n,
            "edits_per_s": spread([x["edits_per_s"] for x in results[n]]),
            "edits_ratio": spread(edits_ratio),
            "ideal_edits_per_s": round(n * 1000.0 / cfg.delay_ms, 2),
            "steps_ratio": spread(speed_ratio),
            "peak_in_flight": max(x["peak_in_flight"] for x in results[n]),
            "per_server": results[n][-1]["per_server"],
            "render_share": spread([x["render_share"] for x in results[n]]),
            "render_chunks_per_step": [x["render_chunks_per_step"] for x in results[n]],
            "render_steps": [x["render_steps"] for x in results[n]],
            "lag_median": spread([x["render_lag_median"] for x in results[n]]),
            "lag_max": max(x["render_lag_max"] for x in results[n]),
            "sync_ms": spread([x["render_sync_ms"] for x in results[n]]),
            "sync_max_ms": max(x["render_sync_max_ms"] for x in results[n]),
            "sync_share_of_step": spread([x["render_sync_ms"] / cfg.render_sync_steps / x["step_ms"] for x in results[n]]),
        })  # fmt: skip
    off = spread([x["steps_per_s"] for x in results[0]])
    print(f"\nmachine: {machine()}; {elapsed_s:.0f} s in all; delay {cfg.delay_ms:g} ms, "
          f"{cfg.steps} steps a run, {rounds} of {cfg.rounds} rounds; no editing: {off} steps/s; render workers "
          f"{cfg.render_workers} (-1: one a server), {'pinned' if cfg.pin else 'not pinned'}\n")  # fmt: skip
    print(f"| servers | edits/s | ideal ({cfg.delay_ms:g} ms an edit) | edits/s vs 1 server | steps/s vs no editing | "
          "peak in flight | edits per server (last round) | render share | chunks a step at the end (per round) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['servers']} | {row['edits_per_s']} | {row['ideal_edits_per_s']} | {row['edits_ratio']} | "
              f"{row['steps_ratio']} | {row['peak_in_flight']} | {row['per_server']} | {row['render_share']} | {row['render_chunks_per_step']} |")  # fmt: skip
    print(
        "\n| servers | trainer's render steps (per round) | lag, steps: median [min, max] of runs | lag max | "
        "refresh ms: mean [min, max] of runs | refresh max ms | refresh per step / step time |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['servers']} | {row['render_steps']} | {row['lag_median']} | {row['lag_max']} | {row['sync_ms']} | "
            f"{row['sync_max_ms']} | {row['sync_share_of_step']} |"
        )
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / cfg.results).write_text(json.dumps(
        {"machine": machine(), "config": {k: str(v) for k, v in vars(cfg).items()}, "rounds_done": rounds,
         "off_steps_per_s": off, "rows": rows, "runs": {str(n): v for n, v in results.items()}}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))

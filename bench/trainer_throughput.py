"""Does asynchronous editing slow training down? Steps per second with and without edits.

Runs the same `ns-train in2n-tiny` job (small nerfacto, demo scene) in three modes, interleaved
(off, async, sync, off, async, sync, ... for --rounds rounds, all from one shared pretraining), against a diffusion server whose backend takes a fixed time per edit and no CPU
(it sleeps), and compares whole-step wall times (recorded by the pipeline in
edit_report/step_times.npy):

- off:   no edits (the baseline);
- async: this tool, edits streamed while training goes on (render_chunk_rays per step, or as many as
         --pipeline.render-budget allows);
- sync:  the reference behaviour, every edit_rate steps the step renders a view and waits for its edit.

    python bench/trainer_throughput.py --steps 300 --edit-ms 500 --chunk-rays 256 1024 --render-budgets 0.05

Each round's ratio to no editing divides by that round's own "off" run, so a machine whose speed
drifts between rounds (a shared box) moves both sides of a ratio together; the table gives the
median ratio over the rounds and its range (min-max), the median steps/s, and step-time
percentiles pooled over the rounds.

Prints a markdown table (for BENCHMARKS.md) and writes bench/results/trainer_throughput.json.
This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_server.backends.identity import IdentityBackend
from in2n_demo.run import NS_TRAIN, SMALL_NERFACTO, ensure_lpips_backbone
from testing_support import InProcessServer, demo_scene_and_pretrained, read_edit_report


@dataclass
class BenchConfig:
    """Training throughput with asynchronous editing, synchronous editing and none."""

    steps: int = 300
    """Training steps per mode."""
    edit_ms: float = 500.0
    """Fixed time the server takes per edit (sleeping, no CPU)."""
    chunk_rays: list[int] = field(default_factory=lambda: [256, 1024])
    """render_chunk_rays values to measure in async mode."""
    render_budgets: list[float] = field(default_factory=lambda: [0.05])
    """render_budget values to measure in async mode (with budget_chunk_rays a chunk)."""
    budget_chunk_rays: int = 1024
    """render_chunk_rays of the render_budget runs."""
    sync: bool = True
    """Also measure the synchronous mode."""
    edit_rate: int = 10
    """Reference default: an edit every 10 steps (async: an upper bound)."""
    warmup: int = 20
    """Steps left out at the start of each run."""
    rounds: int = 3
    """Interleaved rounds (every mode once per round, in the same order); ratios are per round, then the median."""
    workdir: Path = Path(tempfile.gettempdir()) / "in2n_bench_trainer"
    """Scratch folder (scene, pretrained model, runs)."""
    output: Path = REPO / "bench" / "results" / "trainer_throughput.json"
    """Where the JSON of the figures goes."""


def run_mode(cfg: BenchConfig, load_dir: Path, scene: Path, port: int, mode: str, chunk: int, budget: float,
             env: dict, round_: int = 0) -> tuple:  # fmt: skip
    name = f"{mode}-{chunk}-{budget:g}-r{round_}"
    out = cfg.workdir / "runs"
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(load_dir), "--data", str(scene), "--output-dir", str(out),
           "--experiment-name", "bench", "--timestamp", name, "--vis", "tensorboard", "--machine.device-type", "cpu",
           "--max-num-iterations", str(cfg.steps), "--steps-per-save", "1000000", "--steps-per-eval-image", "1000000",
           "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000",
           "--pipeline.datamanager.train-num-rays-per-batch", "512", "--pipeline.edit-server", f"127.0.0.1:{port}",
           "--pipeline.instruction", "make it sepia", "--pipeline.edit-mode", mode, "--pipeline.edit-rate",
           str(cfg.edit_rate), "--pipeline.render-chunk-rays", str(chunk), "--pipeline.max-in-flight", "2",
           "--pipeline.render-budget", str(budget), "--pipeline.log-every", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = out / "bench" / "in2n-tiny" / name / "edit_report"
    times, stats = read_edit_report(report)
    return times[cfg.warmup :], stats.get("edits_applied", 0), stats.get("render_share", 0.0)


def interleaved_ratios(per_round: list[dict], key: object, base: object) -> list[float]:
    """steps/s of `key` over steps/s of `base`, one ratio per round (both runs of the same round)."""
    return [float(results[base][0].mean() / results[key][0].mean()) for results in per_round]


def summarize(runs: list, per_round: list[dict]) -> list[dict]:
    """One row per run: median steps/s over rounds, median and range of the per-round ratio to "off",
    step-time percentiles over all rounds' steps, edits applied and render share (median per run)."""
    rows = []
    for mode, chunk, budget in runs:
        key = (mode, chunk, budget)
        sps = [1 / float(results[key][0].mean()) for results in per_round]
        ratios = interleaved_ratios(per_round, key, ("off", 0, 0.0))
        pooled = np.concatenate([results[key][0] for results in per_round])
        rows.append({
            "mode": mode, "render_chunk_rays": (f"{chunk}, budget {budget:g}" if budget else chunk),
            "render_share": float(np.median([results[key][2] for results in per_round])),
            "steps_per_s": round(float(np.median(sps)), 3), "steps_per_s_rounds": [round(x, 3) for x in sps],
            "ratio_to_off": round(float(np.median(ratios)), 3), "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "rounds": len(per_round),
            "median_ms": round(float(np.median(pooled)) * 1e3, 1), "p99_ms": round(float(np.percentile(pooled, 99)) * 1e3, 1),
            "p99_over_median": round(float(np.percentile(pooled, 99) / np.median(pooled)), 2),
            "edits_applied": int(np.median([results[key][1] for results in per_round])),
        })  # fmt: skip
    return rows


def main(cfg: BenchConfig) -> None:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ensure_lpips_backbone(env, cfg.workdir)
    scene, load_dir = demo_scene_and_pretrained(
        cfg.workdir,
        NS_TRAIN,
        env,
        num_views=24,
        size=64,
        steps=200,
        rays=512,
        flags=["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-save", "200", *SMALL_NERFACTO],
    )
    if cfg.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {cfg.rounds}")
    # Edits one at a time (max batch 1), each the render back after edit_ms of sleep.
    server = InProcessServer(IdentityBackend(delay_s=cfg.edit_ms / 1e3), device="cpu")
    port = server.port
    try:
        runs = (
            [("off", 0, 0.0)]
            + [("async", c, 0.0) for c in cfg.chunk_rays]
            + [("async", cfg.budget_chunk_rays, b) for b in cfg.render_budgets]
        )
        runs += [("sync", 0, 0.0)] if cfg.sync else []
        per_round = []  # one {run: (times, applied, share)} per round
        for r in range(cfg.rounds):
            results = {}
            for mode, chunk, budget in runs:  # interleaved: every mode once per round, same order
                times, applied, share = run_mode(cfg, load_dir, scene, port, mode, chunk, budget, env, r)
                results[(mode, chunk, budget)] = (times, applied, share)
                print(f"round {r} {mode:5s} chunk={chunk:5d} budget={budget:g}: {1 / times.mean():.2f} steps/s, "
                      f"median {np.median(times) * 1e3:.0f} ms, p99 {np.percentile(times, 99) * 1e3:.0f} ms, edits {applied}, "
                      f"render share {share}", flush=True)  # fmt: skip
            per_round.append(results)
    finally:
        server.close()
    rows = summarize(runs, per_round)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; steps={cfg.steps}, "
          f"edit={cfg.edit_ms:.0f} ms (sleep), edit_rate={cfg.edit_rate}, {cfg.rounds} interleaved rounds\n")  # fmt: skip
    print(
        "| mode | render_chunk_rays | steps/s (median of rounds) | ratio to no editing (median, range) | median step | p99 step | p99 / median | edits applied (per run) | render share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['render_chunk_rays'] or '-'} | {r['steps_per_s']} | {r['ratio_to_off']} ({r['ratio_min']}-{r['ratio_max']}) | "
              f"{r['median_ms']} ms | {r['p99_ms']} ms | {r['p99_over_median']} | {r['edits_applied']} | {r['render_share']} |")  # fmt: skip
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps({"config": {k: str(v) for k, v in vars(cfg).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))

"""The trainer's peak memory (RSS) for each in2n variant on the CPU, on make run's demo scene.

Each variant (`ns-train in2n`, `in2n-small`, `in2n-tiny`, with its own rays per batch and patch
size) trains a few steps from one shared pretrained checkpoint (make run's small nerfacto on the
64x64 demo scene) against a palette server; the peak RSS of the ns-train process is read from
getrusage in a fresh wrapper process per run (so each figure is that run's own peak).

    python bench/variant_memory.py --steps 6

Prints a markdown table (for README/BENCHMARKS.md) and writes bench/results/variant_memory.json.
A benchmark, not a test. It says nothing about GPU memory (bench/gpu measures that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _server import BenchServer, machine

from in2n_demo.run import NS_TRAIN, SMALL_NERFACTO, ensure_lpips_backbone

# Runs `argv` as a child and prints the child's peak RSS in KiB (Linux ru_maxrss), then its exit code.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL).returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)
QUIET = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-eval-image", "1000000",
         "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000"]  # fmt: skip


@dataclass
class MemoryConfig:
    """Peak RSS of the trainer per variant."""

    methods: list[str] = field(default_factory=lambda: ["in2n", "in2n-small", "in2n-tiny"])
    """Variants to measure."""
    steps: int = 6
    """Training steps per variant (enough to reach the steady state's peak: every step allocates the same)."""
    pretrain_steps: int = 50
    """nerfacto steps of the shared checkpoint (its quality does not matter here)."""
    workdir: Path = Path(tempfile.gettempdir()) / "in2n_bench_variant_memory"
    """Scratch folder (scene, pretrained model, runs)."""


def main(cfg: MemoryConfig) -> None:
    from in2n_demo.demo_scene import DemoSceneConfig, make_demo_scene

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    ensure_lpips_backbone(env, cfg.workdir)
    scene = cfg.workdir / "demo"
    if not (scene / "transforms.json").exists():
        make_demo_scene(DemoSceneConfig(output=scene))  # make run's demo scene: 32 views, 64x64
    load_dir = cfg.workdir / "pre" / "demo" / "nerfacto" / "pre" / "nerfstudio_models"
    if not list(load_dir.glob("*.ckpt")):
        subprocess.run([NS_TRAIN, "nerfacto", "--data", str(scene), "--output-dir", str(cfg.workdir / "pre"),
                        "--experiment-name", "demo", "--timestamp", "pre", "--max-num-iterations", str(cfg.pretrain_steps),
                        "--steps-per-save", str(cfg.pretrain_steps), "--pipeline.datamanager.train-num-rays-per-batch",
                        "512", *QUIET, *SMALL_NERFACTO], env=env, check=True, capture_output=True)  # fmt: skip
    rows = []
    with BenchServer("palette") as server:
        for method in cfg.methods:
            cmd = [NS_TRAIN, method, "--load-dir", str(load_dir), "--data", str(scene),
                   "--output-dir", str(cfg.workdir / "runs"), "--experiment-name", "demo", "--timestamp", method,
                   "--max-num-iterations", str(cfg.steps), "--pipeline.edit-server", server.address,
                   "--pipeline.instruction", "make it sepia", "--pipeline.edit-rate", "1", *QUIET]  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-c", PEAK_RSS, *cmd], env=env, capture_output=True, text=True, check=True
            )
            peak_kib, code = (int(x) for x in out.stdout.split())
            if code != 0:
                raise SystemExit(f"{method} failed (exit {code}): {' '.join(cmd)}")
            rows.append({"method": method, "peak_rss_mib": round(peak_kib / 1024)})
            print(rows[-1], flush=True)
    print(
        f"\nmachine: {machine()}; {cfg.steps} steps per variant, variant defaults (rays per batch, patch), demo scene\n"
    )
    print("| method | trainer peak RSS (CPU) |\n|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['peak_rss_mib']} MiB |")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "variant_memory.json").write_text(
        json.dumps({"machine": machine(), "steps": cfg.steps, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main(tyro.cli(MemoryConfig))

"""Smoke test of `bench/gpu/run.sh --kontext`: the flux-kontext benchmark with tiny components on the CPU.

It checks the JSON's structure and that each figure is a positive finite number (GPU figures: null
on the CPU), not the figures themselves (a tiny model's, on a shared CPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kontext_bench_runs_every_batch_size(tmp_path) -> None:
    out = tmp_path / "kontext_bench.json"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--kontext", "--tiny", "--device", "cpu", "--batches", "1", "2",
         "--repeats", "1", "--out", str(out), "--budget-s", "100000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["setup"]["precision"] == "bf16" and report["setup"]["steps"] == 2
    assert all(n > 0 for n in report["setup"]["parameters"].values())
    assert report["floor"]["tflop_per_edit"] > 0 and report["floor"]["measured_matmul_tflops"] is None
    for batch in ("1", "2"):
        row = report["batches"][batch]
        assert "skipped" not in row, row
        for key in ("edits_per_s", "achieved_tflops", "s_per_batch"):
            assert math.isfinite(row[key]) and row[key] > 0, (batch, key, row[key])
        assert row["peak_gpu_bytes"] is None and row["non_finite"] == 0
    summary = report["summary"]
    assert summary["best_batch"] in (1, 2) and summary["edits_per_s_batch_1"] == report["batches"]["1"]["edits_per_s"]

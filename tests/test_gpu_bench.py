"""Smoke test of bench/gpu/run.sh: the GPU benchmark's every step, with tiny components on the CPU.

It checks the JSON's structure and that each figure is a positive finite number (GPU memory:
null on the CPU); not the figures themselves (they are a tiny model's on a shared CPU). The trainer
part runs for real (in2n-tiny, a 32 x 32 scene, a few steps a mode, the tiny IP2P server); its scene,
pretraining and models go to the test's own temporary folder (TMPDIR), nothing cached from before.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _positive(value: object, what: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{what}: {value!r} is not positive and finite"


def _speed(point: dict, what: str) -> None:
    assert "skipped" not in point, f"{what}: {point}"
    _positive(point["edits_per_s"], f"{what}.edits_per_s")
    _positive(point["achieved_tflops"], f"{what}.achieved_tflops")
    assert point["peak_gpu_bytes"] is None  # the CPU has no GPU memory to report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("gpu-bench")
    out = folder / "gpu_bench.json"
    env = dict(
        os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", LIMIT_S="880", TMPDIR=str(folder)
    )
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--tiny", "--device", "cpu", "--compile-backend", "eager", "--out", str(out),
         "--budget-s", "100000"],  # every section, however loaded the machine
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_machine_and_config(report: dict) -> None:
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["config"]["tiny"] is True and report["config"]["batches"] == [1, 2]
    _positive(report["elapsed_s"], "elapsed_s")


def test_editor_reference_backend_and_floor(report: dict) -> None:
    ed = report["editor"]
    assert "error" not in ed, ed.get("traceback")
    _positive(ed["floor"]["tflop_per_edit"], "floor.tflop_per_edit")
    for name in ("reference", "backend"):
        _speed(ed[name], name)
        _positive(ed[name]["ms_per_edit"], f"{name}.ms_per_edit")
    assert ed["backend"]["same_timestep_as_reference"] is True
    assert ed["backend"]["max_abs_diff_vs_reference"] <= 1e-5  # fp32 on the CPU: the same edit


def test_editor_levers(report: dict) -> None:
    ed = report["editor"]
    seen = {(p["lever"], p["batch"]) for p in ed["levers"]}
    assert {("plain", 1), ("plain", 2), ("channels_last", 1), ("channels_last", 2)} <= seen
    for p in ed["levers"]:
        _speed(p, f"{p['lever']}@{p['batch']}")
    assert set(ed["precision_memory"]) == {"fp16", "fp32"}
    assert [r["batch"] for r in ed["vae"]] == [1, 2]
    for r in ed["vae"]:
        _positive(r["encode_2b_ms"], "vae.encode_2b_ms")
        _positive(r["decode_ms"], "vae.decode_ms")
        _positive(r["share_of_batch"], "vae.share_of_batch")
    compiled = ed["compile"]
    assert "skipped" not in compiled, compiled
    assert [p["batch"] for p in compiled["points"]] == [1, 2]
    for p in compiled["points"] + [compiled["again"]]:
        _speed(p, "compile")
    assert compiled["recompiles_at_a_seen_size"] == 0


def test_server_rows(report: dict) -> None:
    rows = report["editor"]["server"]
    assert [r["max_batch"] for r in rows] == [1, 2]
    for r in rows:
        assert "skipped" not in r, r
        for key in ("edits_per_s", "p50_latency_ms", "start_s", "peak_rss_bytes"):
            _positive(r[key], f"server@{r['max_batch']}.{key}")
        assert r["peak_gpu_bytes"] is None


def test_trainer_runs_every_mode(report: dict) -> None:
    tr = report["trainer"]
    assert "skipped" not in tr and "stopped" not in tr, tr
    setup = tr["setup"]
    assert setup["method"] == "in2n-tiny" and setup["server_precision"] == "bf16"  # in2n-tiny's fp16, on the CPU
    for key in ("scene_and_pretrain_s", "server_start_s"):
        _positive(setup[key], f"trainer.setup.{key}")
    runs = {r["mode"]: r for r in tr["runs"]}
    assert [(r["mode"], r["round"]) for r in tr["runs"]] == [("async", 0), ("sync", 0), ("off", 0)]
    steps = (
        report["config"]["trainer_steps"] - 1 - report["config"]["warmup_steps"]
    )  # step_times: one per step after the first
    for mode, r in runs.items():
        assert r["steps_timed"] == steps, r
        for key in ("steps_per_s", "median_step_ms", "p99_step_ms", "wall_s", "loop_s", "peak_rss_bytes"):
            _positive(r[key], f"trainer.{mode}.{key}")
        assert r["p99_over_median"] >= 1 and r["edits_failed"] == 0, r
        assert 0 <= r["render_share"] < 1 and r["peak_gpu_bytes"] is None, r
    assert runs["off"]["edits_applied"] == 0 and runs["off"]["render_share"] == 0
    assert runs["sync"]["edits_applied"] >= 1  # sync waits for each edit: the server answered
    _positive(tr["server_peak"]["peak_rss_bytes"], "trainer.server_peak.peak_rss_bytes")


def test_trainer_summary_and_end_to_end(report: dict) -> None:
    tr = report["trainer"]
    modes = tr["modes"]
    assert set(modes) == {"off", "async", "sync"} and modes["off"]["ratio_to_off"] == 1.0
    for mode, m in modes.items():
        assert m["rounds"] == 1
        _positive(m["steps_per_s"], f"trainer.modes.{mode}.steps_per_s")
        _positive(m["ratio_to_off"], f"trainer.modes.{mode}.ratio_to_off")
        assert m["steps_per_s"] == next(r["steps_per_s"] for r in tr["runs"] if r["mode"] == mode)  # one round: its run
    e2e = tr["end_to_end"]
    assert e2e["rounds"] == 1
    for key in (
        "async_wall_s",
        "sync_wall_s",
        "sync_over_async_wall",
        "async_loop_s",
        "sync_loop_s",
        "sync_over_async_loop",
    ):
        _positive(e2e[key], f"trainer.end_to_end.{key}")
    assert e2e["sync_edits_applied"] == next(r["edits_applied"] for r in tr["runs"] if r["mode"] == "sync")

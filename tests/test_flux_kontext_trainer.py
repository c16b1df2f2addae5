"""The trainer against a real tiny-flux-kontext server: one short real `ns-train in2n-tiny` run.

It proves the backend swaps in behind the same contract: the trainer takes the server's backend
defaults (Describe) for the parameters left unset and says so once, names the parameter set that the
backend ignores, does not flag the backend's fixed bf16 as a precision mismatch, and applies the edits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import NS_TRAIN, QUIET, EditServerProcess


@pytest.fixture(scope="module")
def kontext_run(pretrained, trainer_env, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A 30-step in2n-tiny run against a tiny-flux-kontext server (its default 28 steps an edit), the variant told to expect fp32."""
    tmp = tmp_path_factory.mktemp("kontext")
    with EditServerProcess(tmp / "server", backend="tiny-flux-kontext") as server:
        cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(tmp / "out"),
               "--experiment-name", "tiny", "--timestamp", "edit", "--max-num-iterations", "30",
               "--pipeline.edit-server", server.address, "--pipeline.datamanager.train-num-rays-per-batch", "256",
               "--pipeline.edit-rate", "1", "--pipeline.edit-seed", "0", "--pipeline.instruction", "make it red",
               "--pipeline.lower-bound", "0.5", "--pipeline.image-guidance-scale", "2.0",
               "--pipeline.server-precision-hint", "fp32", *QUIET]  # fmt: skip
        proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, tmp / "out" / "tiny" / "in2n-tiny" / "edit"


def test_the_trainer_edits_with_the_kontext_servers_defaults(kontext_run):
    proc, run_dir = kontext_run
    said = [line for line in proc.stdout.splitlines() if "runs tiny-flux-kontext" in line]
    assert len(said) == 1, proc.stdout[-3000:]  # once
    assert "guidance_scale 3.5" in said[0] and "diffusion_steps 28" in said[0]  # the backend's, not IP2P's 7.5 / 20
    assert "lower_bound" not in said[0]  # set by the user: not a default
    assert "ignores image_guidance_scale" in said[0]  # set by the user, unused by Kontext
    assert "runs IP2P in" not in proc.stdout  # bf16 is what flux-kontext runs whatever the variant
    report = run_dir / "edit_report"
    stats = json.loads((report / "edit_stats.json").read_text())
    assert stats["edits_applied"] >= 1 and stats["edits_rejected"] == 0, stats
    snapshot = np.load(report / "training_images.npz")
    edited = snapshot["edits_per_view"] >= 1
    assert (snapshot["images"][edited] != snapshot["originals"][edited]).any()  # the edits went in

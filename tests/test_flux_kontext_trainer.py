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
    server = EditServerProcess(tmp / "server", backend="tiny-flux-kontext").spawn().wait_ready(300)  # a loaded CPU
    try:
        cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(tmp / "out"),
               "--experiment-name", "tiny", "--timestamp", "edit", "--max-num-iterations", "30",
               "--pipeline.edit-server", server.address, "--pipeline.datamanager.train-num-rays-per-batch", "256",
               "--pipeline.edit-rate", "1", "--pipeline.edit-seed", "0", "--pipeline.instruction", "make it red",
               "--pipeline.lower-bound", "0.5", "--pipeline.image-guidance-scale", "2.0",
               "--pipeline.server-precision-hint", "fp32", *QUIET]  # fmt: skip
        proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
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


def test_settings_from_a_describe_and_the_fixed_precision() -> None:
    """What the trainer sends for each parameter: the user's, else the Describe's defaults, else (a server older
    than those fields) the contract's; and flux-kontext's bf16 is no mismatch, another backend's is."""
    from types import SimpleNamespace

    from in2n_contract import pb
    from nerf_trainer.servers import described_defaults, edit_settings, precision_mismatch

    info = pb.DescribeResponse(
        backend="flux-kontext",
        defaults=pb.EditDefaults(guidance_scale=3.5, diffusion_steps=28, lower_bound=0.02, upper_bound=0.98),
        ignored_fields=["image_guidance_scale"],
    )
    defaults = described_defaults(info)
    assert defaults["lower_bound"] == 0.02 and defaults["diffusion_steps"] == 28  # not float32's 0.0199999995
    config = SimpleNamespace(
        guidance_scale=None, image_guidance_scale=None, diffusion_steps=10, lower_bound=None, upper_bound=0.9
    )
    assert edit_settings(config, defaults) == {"guidance_scale": 3.5, "image_guidance_scale": 0.0,
                                               "diffusion_steps": 10, "lower_bound": 0.02, "upper_bound": 0.9}  # fmt: skip
    assert described_defaults(pb.DescribeResponse(backend="old")) is None
    assert edit_settings(config, None)["guidance_scale"] == 7.5 and edit_settings(config, None)["diffusion_steps"] == 10
    assert precision_mismatch("fp32", "h:1", "bf16", "cuda:0", "flux-kontext") is None
    assert precision_mismatch("fp32", "h:1", "bf16", "cuda:0", "ip2p") is not None

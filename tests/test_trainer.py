"""The trainer end to end: real `ns-train` runs on a tiny scene against a real diffusion server.

A tiny nerfacto is pretrained once per session (`ns-train nerfacto`); each test
then runs `ns-train in2n-tiny --load-dir ...` against a server process and reads
what the run wrote (the edited training images, the report, the effective config).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NS_TRAIN, QUIET, EditServerProcess
from PIL import Image

from testing_support import free_port


def run_in2n(load_dir: Path, out: Path, server: str, env: dict, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(load_dir), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "edit", "--max-num-iterations", str(steps), "--pipeline.edit-server", server,
           "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.edit-rate", "1",
           "--pipeline.edit-seed", "0", *QUIET, *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def saturation(image: np.ndarray) -> float:
    """Mean (max - min) over channels of [..., 3] uint8 images, in [0, 255]."""
    image = image.astype(np.float64)
    return float((image.max(axis=-1) - image.min(axis=-1)).mean())


def test_ns_train_lists_the_in2n_methods_and_documents_their_options(trainer_env):
    proc = subprocess.run([NS_TRAIN, "in2n", "--help"], env=trainer_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--pipeline.edit-server", "--pipeline.instruction", "--pipeline.guidance-scale",
                   "--pipeline.image-guidance-scale", "--pipeline.diffusion-steps", "--pipeline.lower-bound",
                   "--pipeline.upper-bound", "--pipeline.max-in-flight", "--pipeline.model.use-lpips"):  # fmt: skip
        assert option in proc.stdout, option
    for method in ("in2n-small", "in2n-tiny"):
        assert (
            subprocess.run([NS_TRAIN, method, "--help"], env=trainer_env, capture_output=True, timeout=300).returncode
            == 0
        )


@pytest.fixture(scope="module")
def grayscale_run(pretrained, trainer_env, tmp_path_factory) -> Path:
    """A 300-step in2n-tiny run against a palette server turning the scene gray; its run folder."""
    tmp = tmp_path_factory.mktemp("grayscale")
    with EditServerProcess(tmp / "server", backend="palette") as server:
        proc = run_in2n(pretrained, tmp / "out", server.address, trainer_env, 300,
                        "--pipeline.instruction", "make it grayscale")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (tmp / "stdout.txt").write_text(proc.stdout)
    return tmp / "out" / "tiny" / "in2n-tiny" / "edit"


def test_progress_counts_the_edit_runs_own_steps(grayscale_run):
    """The terminal table of a 300-step edit resumed from a pretrained nerfacto reads 0 to 100 %, not past it."""
    stdout = (grayscale_run.parents[3] / "stdout.txt").read_text()
    rows = re.findall(r"^(\d+) \((\d+\.\d+)%\)", stdout, flags=re.MULTILINE)
    assert rows, stdout[-2000:]
    assert max(float(p) for _, p in rows) <= 100.0
    assert int(rows[0][0]) <= 10 and float(rows[-1][1]) >= 95.0  # counted from this run's first step to its last


def test_in2n_edits_every_view_and_the_nerf_follows(grayscale_run, tiny_scene):
    """A few hundred steps against a real server: every view swapped, originals untouched, NeRF turns gray."""
    report = grayscale_run / "edit_report"
    snapshot = np.load(report / "training_images.npz")
    images, originals, counts = snapshot["images"], snapshot["originals"], snapshot["edits_per_view"]
    assert (counts >= 1).all(), f"views never edited: {np.flatnonzero(counts == 0).tolist()}"
    # Every training image was swapped for a grayscale edit; the originals were kept aside untouched.
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    assert saturation(originals) > 20
    scene_images = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in (tiny_scene / "images").glob("*.png")}
    assert all(original.tobytes() in scene_images for original in originals)
    stats = json.loads((report / "edit_stats.json").read_text())
    assert stats["edits_rejected"] == 0 and stats["edits_applied"] >= len(counts)

    # The NeRF itself followed the edit: its renders lost most of their colour.
    before = np.stack([np.asarray(Image.open(p)) for p in sorted(report.glob("view_*_before.png"))])
    after = np.stack([np.asarray(Image.open(p)) for p in sorted(report.glob("view_*_after.png"))])
    assert len(before) == len(after) >= 2
    assert saturation(after) < 0.5 * saturation(before), (saturation(before), saturation(after))
    assert (report / "evolution.png").exists() and (report / "before_after.png").exists()

    # The edit model took the pretrained model's settings (else its checkpoint would not even load).
    config = yaml.load((grayscale_run / "config.yml").read_text(), Loader=yaml.Loader)
    assert config.pipeline.model.num_levels == 4 and config.pipeline.model.hidden_dim == 16


def latest_edits(run_dir: Path) -> dict:
    saved = sorted((run_dir / "in2n_edits").glob("step-*.pt"))
    assert saved, f"no edits saved in {run_dir / 'in2n_edits'}"
    return torch.load(saved[-1], map_location="cpu", weights_only=True)


def test_resume_restores_the_edited_dataset_exactly(grayscale_run, trainer_env, tmp_path):
    """Resuming an in2n checkpoint puts its edited images back, not the originals; with no server up,
    training goes on with them, untouched."""
    saved = latest_edits(grayscale_run)
    assert len(saved["views"]) == saved["num_views"]
    proc = run_in2n(grayscale_run / "nerfstudio_models", tmp_path / "out", f"127.0.0.1:{free_port()}", trainer_env, 20,
                    "--pipeline.instruction", "make it grayscale")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restored" in proc.stdout
    resumed = latest_edits(tmp_path / "out" / "tiny" / "in2n-tiny" / "edit")
    assert torch.equal(resumed["views"], saved["views"])
    assert torch.equal(resumed["images"], saved["images"])  # bit-identical
    assert resumed["schedule"]["edits_per_view"] == saved["schedule"]["edits_per_view"]
    assert resumed["schedule"]["order"] == saved["schedule"]["order"]


def test_export_writes_a_nerfstudio_dataset_of_the_edits(grayscale_run, tmp_path):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from nerf_trainer.export import ExportConfig, export_edited_dataset

    transforms = export_edited_dataset(ExportConfig(run=grayscale_run, output=tmp_path / "edited"))
    meta = json.loads(transforms.read_text())
    saved = latest_edits(grayscale_run)
    assert len(meta["frames"]) == saved["num_views"]
    for frame in meta["frames"]:
        image = np.asarray(Image.open(tmp_path / "edited" / frame["file_path"]))
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    parser = NerfstudioDataParserConfig(data=tmp_path / "edited", train_split_fraction=1.0).setup()
    outputs = parser.get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == saved["num_views"]


def test_require_server_fails_fast_with_a_clear_message(pretrained, trainer_env, tmp_path):
    proc = run_in2n(pretrained, tmp_path / "out", f"127.0.0.1:{free_port()}", trainer_env, 20,
                    "--pipeline.require-server", "True", "--pipeline.connect-timeout-s", "2")  # fmt: skip
    assert proc.returncode != 0
    assert "no diffusion server ready" in proc.stdout + proc.stderr


def test_in2n_runs_against_a_diffusion_backend(pretrained, trainer_env, tmp_path):
    """The whole path with a real (tiny, random) InstructPix2Pix on the server: edits arrive and are swapped in."""
    with EditServerProcess(tmp_path / "server", backend="tiny-ip2p") as server:
        proc = run_in2n(pretrained, tmp_path / "out", server.address, trainer_env, 40,
                        "--pipeline.instruction", "turn it into a statue", "--pipeline.diffusion-steps", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    snapshot = np.load(tmp_path / "out" / "tiny" / "in2n-tiny" / "edit" / "edit_report" / "training_images.npz")
    edited = np.flatnonzero(snapshot["edits_per_view"])
    assert len(edited) >= 2
    # An edited view differs from its original; a view never edited still equals it.
    for view in edited:
        assert not np.array_equal(snapshot["images"][view], snapshot["originals"][view])
    for view in np.flatnonzero(snapshot["edits_per_view"] == 0):
        assert np.array_equal(snapshot["images"][view], snapshot["originals"][view])


def test_in2n_reaches_a_server_that_requires_a_token(pretrained, trainer_env, tmp_path):
    """A server started with --token: the trainer's edits go through with IN2N_TOKEN set (and only then)."""
    with EditServerProcess(tmp_path / "server", backend="palette", extra_args=["--token", "s3cret"]) as server:
        proc = run_in2n(pretrained, tmp_path / "out", server.address, dict(trainer_env, IN2N_TOKEN="s3cret"), 40,
                        "--pipeline.instruction", "make it sepia")  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        refused = run_in2n(pretrained, tmp_path / "refused", server.address, dict(trainer_env, IN2N_TOKEN="wrong"), 30,
                           "--pipeline.instruction", "make it sepia")  # fmt: skip
        assert refused.returncode == 0, "a refused edit never stops training"
    stats = json.loads(
        (tmp_path / "out" / "tiny" / "in2n-tiny" / "edit" / "edit_report" / "edit_stats.json").read_text()
    )
    assert stats["edits_applied"] >= 1
    refused_stats = json.loads(
        (tmp_path / "refused" / "tiny" / "in2n-tiny" / "edit" / "edit_report" / "edit_stats.json").read_text()
    )
    assert refused_stats["edits_applied"] == 0


def test_render_budget_skips_renders_to_keep_its_share(pretrained, trainer_env, tmp_path):
    """--pipeline.render-budget 0.1: a whole 32x32 view (the default chunk renders it at once) costs
    more than 0.1 of a training step, so most steps train only; edits still arrive."""
    steps = 60
    with EditServerProcess(tmp_path / "server", backend="palette") as server:
        proc = run_in2n(pretrained, tmp_path / "out", server.address, trainer_env, steps,
                        "--pipeline.instruction", "make it sepia", "--pipeline.render-budget", "0.1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(
        (tmp_path / "out" / "tiny" / "in2n-tiny" / "edit" / "edit_report" / "edit_stats.json").read_text()
    )
    assert stats["edits_applied"] >= 1, stats
    assert 1 <= stats["render_steps"] <= steps // 2, stats  # without a budget, edit-rate 1 renders nearly every step
    assert 0.0 < stats["render_share"] < 1.0, stats


def test_in2n_with_its_lpips_patch_loss_trains(pretrained, trainer_env, tmp_path):
    """`ns-train in2n` (L1 + LPIPS on 32x32 patches) runs its loss on real patches and edits."""
    with EditServerProcess(tmp_path / "server", backend="palette") as server:
        cmd = [NS_TRAIN, "in2n", "--load-dir", str(pretrained), "--output-dir", str(tmp_path / "out"),
               "--experiment-name", "tiny", "--timestamp", "edit", "--max-num-iterations", "20",
               "--pipeline.edit-server", server.address, "--pipeline.datamanager.train-num-rays-per-batch", "1024",
               "--pipeline.edit-rate", "1", "--pipeline.instruction", "make it sepia", "--logging.steps-per-log", "1",
               *QUIET]  # fmt: skip
        proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / "tiny" / "in2n" / "edit"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    lpips = [e.value for e in events.Scalars("Train Loss Dict/lpips_loss")]
    assert lpips and all(np.isfinite(lpips)) and max(lpips) > 0
    assert json.loads((run / "edit_report" / "edit_stats.json").read_text())["edits_applied"] >= 1

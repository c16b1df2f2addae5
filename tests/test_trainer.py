"""The trainer end to end: real `ns-train` runs on a tiny scene against a real diffusion server.

A tiny nerfacto is pretrained once per session (`ns-train nerfacto`); each test
then runs `ns-train in2n-tiny --load-dir ...` against a server process and reads
what the run wrote (the edited training images, the report, the effective config).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import EditServerProcess, subprocess_env
from nerf_trainer.demo_scene import DemoSceneConfig, make_demo_scene

NS_TRAIN = str(Path(sys.executable).with_name("ns-train"))
# Smaller than make run's nerfacto: about 0.05 s a step on one CPU thread.
TINY_NERFACTO = [
    "--pipeline.model.implementation", "torch",
    "--pipeline.model.num-nerf-samples-per-ray", "16",
    "--pipeline.model.num-proposal-samples-per-ray", "32", "16",
    "--pipeline.model.num-levels", "4",
    "--pipeline.model.log2-hashmap-size", "12",
    "--pipeline.model.max-res", "128",
    "--pipeline.model.hidden-dim", "16",
    "--pipeline.model.hidden-dim-color", "16",
]  # fmt: skip
QUIET = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-eval-image", "1000000",
         "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000"]  # fmt: skip


@pytest.fixture(scope="session")
def trainer_env(tmp_path_factory) -> dict:
    """Child environment with a randomly initialised AlexNet planted for nerfacto's LPIPS (no download)."""
    import torch
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    env = subprocess_env()
    env["TORCH_HOME"] = str(home)
    return env


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    make_demo_scene(DemoSceneConfig(output=out, num_views=16, size=32))
    return out


@pytest.fixture(scope="session")
def pretrained(tiny_scene, trainer_env, tmp_path_factory) -> Path:
    """nerfstudio_models folder of a tiny nerfacto trained 150 steps on the tiny scene."""
    out = tmp_path_factory.mktemp("pretrain")
    cmd = [NS_TRAIN, "nerfacto", "--data", str(tiny_scene), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "pre", "--max-num-iterations", "150", "--steps-per-save", "150",
           "--pipeline.datamanager.train-num-rays-per-batch", "256", *QUIET, *TINY_NERFACTO]  # fmt: skip
    proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    load_dir = out / "tiny" / "nerfacto" / "pre" / "nerfstudio_models"
    assert list(load_dir.glob("step-*.ckpt")), f"no checkpoint in {load_dir}"
    return load_dir


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
        assert subprocess.run([NS_TRAIN, method, "--help"], env=trainer_env, capture_output=True, timeout=300).returncode == 0


def test_in2n_edits_every_view_and_the_nerf_follows(pretrained, tiny_scene, trainer_env, tmp_path):
    """A few hundred steps against a palette server: every view swapped, originals untouched, NeRF turns gray."""
    with EditServerProcess(tmp_path / "server", backend="palette") as server:
        proc = run_in2n(pretrained, tmp_path / "out", server.address, trainer_env, 300,
                        "--pipeline.instruction", "make it grayscale")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "tiny" / "in2n-tiny" / "edit"
    report = run_dir / "edit_report"

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
    config = yaml.load((run_dir / "config.yml").read_text(), Loader=yaml.Loader)
    assert config.pipeline.model.num_levels == 4 and config.pipeline.model.hidden_dim == 16


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

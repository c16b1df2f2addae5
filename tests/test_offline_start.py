"""The first run by hand on a machine without AlexNet's weights and without network: real `ns-train` processes.

The environment: an empty TORCH_HOME, HF_HUB_OFFLINE=1 (the project's "offline" switch) and every HTTP(S) proxy
pointed at a port where nothing listens, so that a download, if one were tried, would fail at once instead of
waiting on DNS. `ns-train in2n-tiny` (no LPIPS loss) trains, evaluates without the LPIPS metric and says so once,
and says once which hash-grid implementation runs; `ns-train in2n` (LPIPS loss) stops before training with one
line naming the missing file and TORCH_HOME. In-process: the model's own pieces (the stand-in metric, the
rendering config, a failed download, the hash-grid line).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import NS_TRAIN, subprocess_env

from testing_support import dead_address, free_port

pytestmark = pytest.mark.filterwarnings("ignore")

ALEXNET = Path("hub") / "checkpoints" / "alexnet-owt-7be5be79.pth"


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict:
    """A trainer's environment with no AlexNet anywhere and no way out: downloads fail at once, never hang."""
    env = subprocess_env()
    env["TORCH_HOME"] = str(tmp_path_factory.mktemp("empty_torch_home"))
    env["HF_HUB_OFFLINE"] = "1"
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[name] = dead_proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"  # the edit server's address stays direct
    env["COLUMNS"] = "200"
    return env


def ns_train(method: str, pretrained: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [NS_TRAIN, method, "--load-dir", str(pretrained), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "offline", "--vis", "tensorboard", "--machine.device-type", "cpu",
           "--pipeline.edit-server", dead_address(), "--pipeline.instruction", "make it sepia", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(pretrained, offline_env, tmp_path_factory):
    """`ns-train in2n-tiny`, 4 steps, an evaluation image every 2 steps (PSNR, SSIM: no LPIPS)."""
    out = tmp_path_factory.mktemp("offline_tiny")
    proc = ns_train("in2n-tiny", pretrained, out, offline_env, "--max-num-iterations", "4",
                    "--steps-per-eval-image", "2", "--steps-per-eval-batch", "1000000",
                    "--steps-per-eval-all-images", "1000000", "--pipeline.datamanager.train-num-rays-per-batch", "256")  # fmt: skip
    return proc, out / "tiny" / "in2n-tiny" / "offline"


def test_in2n_tiny_trains_and_evaluates_without_alexnet_and_says_so_once(tiny_run, offline_env):
    proc, run = tiny_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "gaierror" not in output, output[-4000:]
    assert "Downloading" not in output, "a download was tried"
    assert not any(Path(offline_env["TORCH_HOME"]).rglob("*")), "something was written to TORCH_HOME"
    said = [line for line in output.splitlines() if "no LPIPS evaluation metric" in line]
    assert len(said) == 1, output[-4000:]
    assert list((run / "nerfstudio_models").glob("step-*.ckpt")), "no checkpoint: training did not finish"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert any(tag.endswith("psnr") and "Eval" in tag for tag in tags), tags  # the evaluation ran
    assert not any("lpips" in tag.lower() for tag in tags), tags


def test_the_trainer_says_once_which_hash_grid_runs(tiny_run):
    proc, _ = tiny_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "in2n: hash grid:" in line]
    assert len(lines) == 1 and "torch implementation" in lines[0], lines  # the pretrained model's, on the CPU
    assert "Using a slow implementation" not in proc.stdout + proc.stderr  # nerfstudio's per-module warnings


def test_in2n_without_alexnet_stops_before_training_in_one_line(pretrained, offline_env, tmp_path):
    proc = ns_train("in2n", pretrained, tmp_path / "out", offline_env, "--max-num-iterations", "4",
                    "--pipeline.datamanager.train-num-rays-per-batch", "1024")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "Traceback" not in output and "Downloading" not in output, output[-4000:]
    (line,) = [line for line in proc.stderr.splitlines() if "AlexNet" in line]
    assert line.startswith("in2n: ") and str(ALEXNET) in line and "TORCH_HOME" in line, line
    assert offline_env["TORCH_HOME"] in line  # where it looked
    assert not list((tmp_path / "out").rglob("step-*.ckpt")), "it trained"


# -- in-process ---------------------------------------------------------------------------------------------


SMALL = {"num_nerf_samples_per_ray": 8, "num_proposal_samples_per_ray": (16, 8), "num_levels": 4,
         "log2_hashmap_size": 12, "max_res": 64, "hidden_dim": 16, "hidden_dim_color": 16,
         "implementation": "torch"}  # fmt: skip


def build(config):
    import torch
    from nerfstudio.data.scene_box import SceneBox

    return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=4)


def test_a_model_for_rendering_needs_no_alexnet_and_loads_a_checkpoint_that_has_one(monkeypatch, tmp_path):
    """rendering_model_config(a pretrained nerfacto's model): an In2nModel without LPIPS that loads, strictly,
    the state dict of a model that had the LPIPS network (its "lpips." keys are ignored)."""
    import torch
    import torchvision
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    from nerf_trainer.model import In2nModelConfig, rendering_model_config

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "with"))
    (tmp_path / "with" / ALEXNET).parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "with" / ALEXNET)
    full = build(In2nModelConfig(use_lpips=False, lpips_metric=True, **SMALL))
    state = full.state_dict()
    assert any(k.startswith("lpips.") for k in state)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no AlexNet from here on
    model = build(rendering_model_config(NerfactoModelConfig(**SMALL)))
    assert not model.has_lpips and not any(k.startswith("lpips.") for k in model.state_dict())
    model.load_state_dict(state)  # strict: every other key matches
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("lpips.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_a_failed_download_is_one_line_naming_the_file(monkeypatch, tmp_path):
    """Not declared offline: the download is tried (here through a dead proxy: refused at once) and its failure
    is the same one line, with the cause."""
    from nerf_trainer.model import In2nModelConfig, LpipsWeightsMissing

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LpipsWeightsMissing) as failed:
        build(In2nModelConfig(use_lpips=True, **SMALL))
    message = str(failed.value)
    assert "\n" not in message and str(tmp_path / ALEXNET) in message and "download failed" in message, message


def test_without_tiny_cuda_nn_the_hash_grid_is_the_torch_one():
    from nerfstudio.utils.external import TCNN_EXISTS

    from nerf_trainer.model import hash_grid_line

    if TCNN_EXISTS:
        assert hash_grid_line("tcnn")[0] == "tcnn"
    else:
        runs, line = hash_grid_line("tcnn")
        assert runs == "torch" and "tiny-cuda-nn" in line and "not installed" in line and "docs/install.md" in line
    assert hash_grid_line("torch")[0] == "torch"


def test_a_checkpoint_from_the_other_hash_grid_is_refused_in_one_line():
    """A tiny-cuda-nn checkpoint (one flat `params` per module; simulated: tiny-cuda-nn needs CUDA) into a model
    running the torch hash grid: refused, naming both, instead of nerfstudio's silent non-strict retry."""
    import torch

    from nerf_trainer.model import HashGridMismatch, In2nModelConfig

    model = build(In2nModelConfig(use_lpips=False, lpips_metric=False, **SMALL))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("hash_table")}
    state["field.mlp_base_grid.tcnn_encoding.params"] = torch.zeros(16)
    with pytest.raises(HashGridMismatch) as refused:
        model.load_state_dict(state)
    message = str(refused.value)
    assert "\n" not in message and "tiny-cuda-nn" in message and "torch" in message, message
    model.load_state_dict(model.state_dict())  # its own kind loads

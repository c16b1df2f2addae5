"""Shared pytest set-up.

Sections (each self-contained; add new ones below, do not mix):
1. Import path and environment: tests run with PYTHONPATH=<repo root> or with the package installed;
   fixture `one_torch_thread`. Helpers shared with bench/ (free ports, RSS, GateBackend, InProcessServer)
   are in testing_support/.
2. Diffusion server subprocesses: fixtures `edit_server`, `edit_server_address`, `edit_server_factory`,
   `shared_palette_server`, `child_env`.
3. Trainer runs: fixtures `trainer_env` (child env with a planted random AlexNet for LPIPS),
   `tiny_scene` (16 views, 32x32), `pretrained` (a tiny nerfacto from a real `ns-train nerfacto`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# ==================================================================================================
# 1. Import path and environment
# ==================================================================================================

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Re-exported: tests import TINY_NERFACTO and subprocess_env from conftest.
from testing_support import TINY_NERFACTO, ServerProcess, subprocess_env

# Nothing in the tests may download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def child_env() -> dict:
    """`subprocess_env()` as a fixture."""
    return subprocess_env()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a 2-core box shared with other processes, 2 threads run ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ==================================================================================================
# 2. Diffusion server subprocesses
# ==================================================================================================

EditServerProcess = ServerProcess
"""A real `python -m diffusion_server` subprocess on 127.0.0.1 (testing_support.ServerProcess, the name tests use)."""


def start_edit_server(
    workdir: Path, backend: str = "palette", port: int = 0, extra_args: Sequence[str] = ()
) -> EditServerProcess:
    """Start a diffusion server subprocess and return its handle (call .stop() when done)."""
    return EditServerProcess(workdir, backend, port, extra_args).start()


@pytest.fixture
def edit_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EditServerProcess]:
    """A running diffusion server subprocess; backend "palette" unless parametrised indirectly."""
    backend = getattr(request, "param", "palette")
    server = start_edit_server(tmp_path / "edit_server", backend=backend)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def edit_server_address(edit_server: EditServerProcess) -> str:
    """ "127.0.0.1:PORT" of the `edit_server` fixture."""
    return edit_server.address


@pytest.fixture
def edit_server_factory(tmp_path: Path) -> Iterator[Callable[..., EditServerProcess]]:
    """`start(backend="palette", port=0, extra_args=(), start=True)` -> EditServerProcess; all stopped at teardown."""
    servers: list[EditServerProcess] = []

    def start(
        backend: str = "palette", port: int = 0, extra_args: Sequence[str] = (), start: bool = True
    ) -> EditServerProcess:
        server = EditServerProcess(tmp_path / f"edit_server_{len(servers)}", backend, port, extra_args)
        servers.append(server)
        return server.start() if start else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_palette_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditServerProcess]:
    """One palette server for a whole test module (for tests that do not stop or break it)."""
    server = start_edit_server(tmp_path_factory.mktemp("shared_palette_server"))
    try:
        yield server
    finally:
        server.stop()


# ==================================================================================================
# 3. Trainer runs
# ==================================================================================================

NS_TRAIN = str(Path(sys.executable).with_name("ns-train"))
QUIET = ["--vis", "tensorboard", "--machine.device-type", "cpu", "--steps-per-eval-image", "1000000",
         "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000"]  # fmt: skip
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


@pytest.fixture(scope="session")
def trainer_env(tmp_path_factory) -> dict:
    """Child environment with a randomly initialised AlexNet planted for nerfacto's LPIPS (no download)."""
    import torch
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), home / "hub" / "checkpoints" / ALEXNET_FILE)
    env = subprocess_env()
    env["TORCH_HOME"] = str(home)
    env["COLUMNS"] = "200"  # rich wraps log lines at the terminal width; tests read them
    return env


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    from in2n_demo.demo_scene import DemoSceneConfig, make_demo_scene

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


def make_pipeline(tiny_scene, trainer_env, **overrides):
    """A tiny in2n pipeline (tiny scene, tiny nerfacto) on the CPU; `overrides` go to In2nPipelineConfig."""
    from nerf_trainer.datamanager import In2nDataManagerConfig
    from nerf_trainer.model import In2nModelConfig
    from nerf_trainer.pipeline import In2nPipelineConfig

    old_home = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = trainer_env["TORCH_HOME"]  # the planted AlexNet for nerfacto's LPIPS metric
    try:
        config = In2nPipelineConfig(
            datamanager=In2nDataManagerConfig(data=tiny_scene, train_num_rays_per_batch=128),
            model=In2nModelConfig(
                implementation="torch",
                num_nerf_samples_per_ray=8,
                num_proposal_samples_per_ray=(16, 8),
                num_levels=4,
                log2_hashmap_size=12,
                max_res=64,
                hidden_dim=16,
                hidden_dim_color=16,
                use_lpips=False,
                average_init_density=0.01,
            ),
            **{
                "edit_server": "scripted:1",
                "render_chunk_rays": 0,
                "edit_seed": 0,
                "edit_rate": 1,
                "sheet_views": 2,
                "log_every": 0,
                "instruction": "make it grayscale",
                **overrides,
            },
        )
        return config.setup(device="cpu", test_mode="val")
    finally:
        if old_home is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = old_home

"""What tests/ and bench/ share: free ports, a process's RSS, a gated fake backend, an in-process server,
the tiny nerfacto flags and a demo scene with a pretrained nerfacto.

A top-level package (not shipped: pyproject lists only the project's packages) so that both can import it
the same way: tests through conftest's sys.path entry for the repo root, bench scripts (run as
`python bench/x.py`) through the repo-root entry they put on sys.path before importing the project.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path
from typing import List, Sequence, Tuple

import grpc
import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditParams, EditResult


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_address() -> str:
    """"127.0.0.1:PORT" with nothing listening on PORT (a free port): connecting to it fails."""
    return f"127.0.0.1:{free_port()}"


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid`, in bytes."""
    import psutil

    return psutil.Process(pid).memory_info().rss


class GateBackend(EditBackend):
    """A fake backend: edit = the render, instruction "original" gives the original, "wait" blocks until
    `gate` opens (setting `started` first), "boom" raises. timestep = int(upper_bound * 999), so a test can
    see which parameters reached the backend. Records every instruction it computed (`edited`, in order) and
    the size of every batch call (`batch_sizes`; batches only with batching=True)."""

    def __init__(self, batching: bool = False) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.edited: List[str] = []
        self.batch_sizes: List[int] = []
        self.supports_batching = batching

    def info(self) -> BackendInfo:
        return BackendInfo(model="gate", device="cpu", precision="fp32")

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        self.edited.append(params.instruction)
        if params.instruction == "wait":
            self.started.set()
            assert self.gate.wait(30), "test never opened the gate"
        if params.instruction == "boom":
            raise RuntimeError("the GPU caught fire")
        image = original if params.instruction == "original" else render
        return EditResult(image=image.copy(), timestep=int(params.upper_bound * 999))

    def edit_batch(self, items):  # type: ignore[no-untyped-def]
        self.batch_sizes.append(len(items))
        return super().edit_batch(items)


class InProcessServer:
    """A started gRPC edit server serving `backend` in this process on 127.0.0.1 and a free port.

    `config` are ServerConfig fields (backend="palette" names the served backend unless given). Has
    `server`, `port`, `address`, `servicer`, `health`, `metrics`, `config`, a channel and `stub`; `close()`
    (or leaving a `with` block) opens a GateBackend's gate and stops everything.
    """

    def __init__(self, backend: EditBackend, **config: object) -> None:
        from diffusion_server.config import ServerConfig
        from diffusion_server.metrics import ServerMetrics
        from diffusion_server.server import build_server
        from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

        self.backend = backend
        self.metrics = ServerMetrics()
        self.config = ServerConfig(**{"backend": "palette", "host": "127.0.0.1", "port": 0, **config})  # type: ignore[arg-type]
        self.server, self.port, self.servicer, self.health = build_server(self.config, backend, self.metrics)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.EditServiceStub(self.channel)

    def close(self) -> None:
        if isinstance(self.backend, GateBackend):
            self.backend.gate.set()
        self.channel.close()
        self.server.stop(grace=None).wait()
        self.servicer.close()
        self.metrics.close()

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GateBackend", "InProcessServer", "dead_address", "free_port", "rss_bytes"]


# nerfacto smaller than make run's: a few hundred steps in well under a minute on one CPU thread.
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


def read_edit_report(report: Path) -> Tuple[np.ndarray, dict]:
    """(step_times, edit_stats) of an in2n run's edit_report folder: the wall time of each whole training step
    after the first ([S-1] seconds) and edit_stats.json's counters ({} when the run did not edit)."""
    stats_file = report / "edit_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return np.load(report / "step_times.npy"), stats


def demo_scene_and_pretrained(
    workdir: Path, ns_train: str, env: dict, *, num_views: int, size: int, steps: int, rays: int, flags: Sequence[str]
) -> Tuple[Path, Path]:
    """(scene, load_dir): the demo scene in workdir/scene and a nerfacto pretrained on it by a real `ns-train`,
    each made only when workdir does not hold it yet. `flags`: the rest of ns-train's arguments (model size, ...)."""
    from in2n_demo.demo_scene import DemoSceneConfig, make_demo_scene

    scene = workdir / "scene"
    if not (scene / "transforms.json").exists():
        make_demo_scene(DemoSceneConfig(output=scene, num_views=num_views, size=size))
    load_dir = workdir / "pre" / "bench" / "nerfacto" / "pre" / "nerfstudio_models"
    if not list(load_dir.glob("*.ckpt")):
        subprocess.run([ns_train, "nerfacto", "--data", str(scene), "--output-dir", str(workdir / "pre"),
                        "--experiment-name", "bench", "--timestamp", "pre", "--max-num-iterations", str(steps),
                        "--pipeline.datamanager.train-num-rays-per-batch", str(rays), *flags],
                       env=env, check=True, capture_output=True)  # fmt: skip
    return scene, load_dir

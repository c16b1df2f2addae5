"""What tests/ and bench/ share: free ports, a process's RSS, a gated fake backend, an in-process server
(the project's, or a test's own servicer), a server subprocess, the tiny nerfacto flags and a demo scene with a pretrained nerfacto.
Its modules: `ip2p_reference` (the published edit written out, that the IP2P backend is checked against and the GPU
benchmark times) and `tiny_ip2p` (the tiny random IP2P saved in diffusers format).

A top-level package (not shipped: pyproject lists only the project's packages) so that both can import it
the same way: tests through conftest's sys.path entry for the repo root, bench scripts (run as
`python bench/x.py`) through the repo-root entry they put on sys.path before importing the project.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import grpc
import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditResult
from in2n_contract import EditParams

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_address() -> str:
    """ "127.0.0.1:PORT" with nothing listening on PORT (a free port): connecting to it fails."""
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
        self.edited: list[str] = []
        self.batch_sizes: list[int] = []
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_servicer(servicer: object, workers: int = 4) -> tuple[grpc.Server, str]:
    """A started gRPC server in this process on 127.0.0.1 and an ephemeral port, running `servicer` (an
    EditServiceServicer a test writes to misbehave: bad answers, a Describe that hangs). Returns (server,
    "127.0.0.1:PORT"); stop it with server.stop(None)."""
    from concurrent import futures

    from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_EditServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def subprocess_env(one_thread: bool = True) -> dict:
    """Environment for child processes: offline hub, the repo root importable, and with `one_thread` one torch
    thread unless set (on a few shared cores server and trainer would oversubscribe them; a GPU run keeps torch's
    own CPU thread count)."""
    env = os.environ.copy()
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class ServerProcess:
    """A `python -m diffusion_server` subprocess on 127.0.0.1; its port comes from --port-file, its output
    goes to a log file in `workdir` (not a pipe: a chatty server never blocks on it).

    `extra_args` follow the backend, device, host and port options; `env` defaults to `subprocess_env()`;
    `script` replaces `-m diffusion_server` (a script that takes the same options, e.g. bench/gpu/serve.py
    and its own first arguments). `start()` spawns and waits for the port file; `stop()` is SIGTERM, then
    SIGKILL after a timeout (`spawn()` and `wait_ready()` are start's two halves). `start_s`: seconds from
    spawn to the port file.
    """

    def __init__(
        self,
        workdir: Path,
        backend: str = "palette",
        port: int = 0,
        extra_args: Sequence[str] = (),
        device: str = "cpu",
        env: Mapping[str, str] | None = None,
        script: Sequence[str] = ("-m", "diffusion_server"),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.device = device
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.script = list(script)
        self.port_file = self.workdir / f"port-{time.monotonic_ns()}"
        self.log_path = self.port_file.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.start_s: float | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, "server not started"
        return f"127.0.0.1:{self.port}"

    def command(self) -> list:
        return [
            sys.executable, *self.script,
            "--backend", self.backend, "--device", self.device,
            "--host", "127.0.0.1", "--port", str(self.requested_port),
            "--port-file", str(self.port_file), *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        """Spawn the server and wait until it serves (`spawn`, then `wait_ready`)."""
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> ServerProcess:
        """Start the process without waiting for it (it loads while the caller does something else)."""
        self._spawned_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            env = self.env if self.env is not None else subprocess_env()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> ServerProcess:
        """Wait (polling, with a deadline) until the spawned server has written its port file: it serves from then on."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"diffusion server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"diffusion server wrote no port file within {timeout_s} s:\n{self.output()}")
            time.sleep(0.02)
        self.start_s = time.monotonic() - self._spawned_at
        self.port = int(self.port_file.read_text().strip())
        return self

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as if the server crashed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful); SIGKILL if it does not exit within timeout_s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "REPO_ROOT",
    "GateBackend",
    "InProcessServer",
    "ServerProcess",
    "dead_address",
    "free_port",
    "rss_bytes",
    "serve_servicer",
    "subprocess_env",
]


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


def read_edit_report(report: Path) -> tuple[np.ndarray, dict]:
    """(step_times, edit_stats) of an in2n run's edit_report folder: the wall time of each whole training step
    after the first ([S-1] seconds) and edit_stats.json's counters ({} when the run did not edit)."""
    stats_file = report / "edit_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return np.load(report / "step_times.npy"), stats


def demo_scene_and_pretrained(
    workdir: Path, ns_train: str, env: dict, *, num_views: int, size: int, steps: int, rays: int, flags: Sequence[str]
) -> tuple[Path, Path]:
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

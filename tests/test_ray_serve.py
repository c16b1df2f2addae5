"""The server as a Ray Serve application, on a real local Ray instance, and the two environments.

The server side runs in the server's environment (.venv-server: Ray Serve, a current protobuf, numpy 2;
`make setup-server`), the trainer and these tests in the trainer's (.venv: nerfstudio, protobuf 3.20.3).
One Ray instance (started by `python -m diffusion_server.ray_serve`, two replicas of the identity backend
at a second per edit, so that edits are in flight when a replica dies) serves the whole module. The trainer
run edits every view through Ray's gRPC proxy while the replica holding its stream is killed (SIGKILL)
mid-run: the stream ends with INTERNAL, the client re-sends what had no answer, no edit is lost. The last
tests check the client's side of that on a small gRPC server whose streams end with INTERNAL (no Ray needed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import NS_TRAIN, QUIET, REPO_ROOT, subprocess_env

from testing_support import free_port

SERVER_PY = REPO_ROOT / ".venv-server" / "bin" / "python"
RAY_STARTUP_TIMEOUT_S = 300.0  # Ray's own start: ~50 s on a loaded 2-core machine
REPLICA_TITLE = "ray::ServeReplica:in2n:EditService"
STREAM_EVENT = re.compile(r"StreamEdit (opened|closed) on replica pid (\d+)")

needs_server_env = pytest.mark.skipif(
    not SERVER_PY.exists(), reason="the server's environment is missing: make setup-server (make setup builds it)"
)


@needs_server_env
def test_generated_code_imports_under_both_protobuf_versions():
    """The committed generated code works with the trainer's protobuf 3.20.3 and the server's current one."""
    import google.protobuf

    from protos.in2n.v1 import edit_service_pb2 as pb

    assert google.protobuf.__version__ == "3.20.3"
    request = pb.EditRequest(request_id="r", view_id=7, instruction="make it sepia", seed=3)
    data = request.SerializeToString()
    code = (
        "import sys, google.protobuf, numpy\n"
        "from protos.in2n.v1 import edit_service_pb2 as pb, edit_service_pb2_grpc as pb_grpc\n"
        "import diffusion_server.service, in2n_client, diffusion_server.ray_serve\n"
        "r = pb.EditRequest.FromString(bytes.fromhex(sys.argv[1]))\n"
        "assert (r.request_id, r.view_id, r.instruction, r.seed) == ('r', 7, 'make it sepia', 3), r\n"
        "assert hasattr(pb_grpc, 'add_EditServiceServicer_to_server')\n"
        "print(google.protobuf.__version__, numpy.__version__)\n"
    )
    proc = subprocess.run([str(SERVER_PY), "-c", code, data.hex()], env=subprocess_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    protobuf_version, numpy_version = proc.stdout.split()
    assert int(protobuf_version.split(".")[0]) >= 4, protobuf_version
    assert int(numpy_version.split(".")[0]) >= 2, numpy_version
    # nerfstudio is not in the server's environment.
    proc = subprocess.run([str(SERVER_PY), "-c", "import nerfstudio"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "No module named 'nerfstudio'" in proc.stderr


class RayServeProcess:
    """`python -m diffusion_server.ray_serve` in the server's environment: a local Ray instance and the app."""

    def __init__(self, workdir: Path, args: list[str]):
        self.port = free_port()
        self.port_file = workdir / "port"
        self.log_path = workdir / "ray_serve.log"
        cmd = [str(SERVER_PY), "-m", "diffusion_server.ray_serve", "--port", str(self.port), "--http-port",
               str(free_port()), "--port-file", str(self.port_file), *args]  # fmt: skip
        env = dict(subprocess_env(), RAY_DEDUP_LOGS="0")  # every replica's log lines, as they come
        with open(self.log_path, "wb") as log:
            # Its own session: Ray's processes (gcs, raylet, workers) are this process's group, killed with it.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                         start_new_session=True)  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray_serve exited with {self.proc.returncode}:\n{self.output()[-5000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray_serve not serving within {timeout_s} s:\n{self.output()[-5000:]}")
            time.sleep(0.1)

    def stream_replica(self, timeout_s: float = 60.0) -> int:
        """Pid of the replica holding the one open stream, from the replicas' log lines (forwarded by Ray)."""
        deadline = time.monotonic() + timeout_s
        while True:
            open_on: list[int] = []
            for event, pid in STREAM_EVENT.findall(self.output()):
                if event == "opened":
                    open_on.append(int(pid))
                elif int(pid) in open_on:
                    open_on.remove(int(pid))
            if len(open_on) == 1:
                return open_on[0]
            assert time.monotonic() < deadline, f"streams open on {open_on}:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def replicas(self) -> list:
        """The replica processes (psutil.Process) of this Ray instance."""
        import psutil

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if REPLICA_TITLE in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve.shutdown() and ray.shutdown()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory) -> Iterator[RayServeProcess]:
    """Two identity replicas (a second per edit) behind Ray Serve's gRPC proxy on a local Ray instance (one start
    for the module)."""
    if not SERVER_PY.exists():
        pytest.skip("the server's environment is missing: make setup-server (make setup builds it)")
    args = ["--backend", "identity", "--delay-ms", "1000", "--device", "cpu", "--replicas", "2", "--num-cpus", "4"]
    server = RayServeProcess(tmp_path_factory.mktemp("ray_serve"), args)
    try:
        try:
            server.wait_serving(RAY_STARTUP_TIMEOUT_S)
        except RuntimeError:
            # Ray gives its raylet a fixed 30 s to register; on a loaded machine that can pass: start once more.
            if "timed out during startup" not in server.output():
                raise
            server.stop()
            server = RayServeProcess(tmp_path_factory.mktemp("ray_serve"), args)
            server.wait_serving(RAY_STARTUP_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def test_contract_through_the_ray_proxy(ray_server):
    """Readiness (Describe, health being UNIMPLEMENTED), Describe, Edit, StreamEdit and validation, via the proxy."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from in2n_client import EditClient, EditFailed, StreamClient
    from in2n_contract import EditParams

    with grpc.insecure_channel(ray_server.address) as channel:
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as malformed:
            channel.unary_unary("/in2n.v1.EditService/Edit")(b"\xff\xff\xff", timeout=30)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert malformed.value.details().startswith("request is not a valid in2n.v1.EditRequest message")

    rng = np.random.default_rng(0)
    render = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # [H, W, 3]
    original = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    params = EditParams(instruction="make it sepia")
    expected = render / 255.0  # the identity backend answers the render
    bad_params = EditParams(instruction="make it sepia", diffusion_steps=0)
    with EditClient(ray_server.address, timeout_s=60) as client:
        client.wait_ready(timeout_s=60)
        info = client.describe()
        assert (info.backend, info.device, info.caches_originals) == ("identity", "cpu", True)
        reply = client.edit(render, original, params, view_id=5)
        assert reply.view_id == 5 and reply.image.shape == (24, 40, 3)
        assert np.abs(reply.image - expected).max() <= 1e-6
        assert reply.timings["compute_ms"] >= 1000  # computed by the replica's backend (--delay-ms 1000)
        with pytest.raises(EditFailed) as bad:
            client.edit(render, original, bad_params)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "diffusion_steps" in bad.value.message
        with pytest.raises(EditFailed) as bad:
            client.edit(render, original[:8], params)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "original: size" in bad.value.message

    with StreamClient(ray_server.address, max_in_flight=4) as stream:
        deadline = time.monotonic() + 60
        while not stream.can_submit():
            assert time.monotonic() < deadline, "stream not connected through the proxy"
            time.sleep(0.02)
        ids = {stream.submit(view, render, original, params): view for view in range(3)}
        bad_id = stream.submit(9, render, original, bad_params)
        results = {}
        while len(results) < 4 and time.monotonic() < deadline:
            results.update({r.request_id: r for r in stream.poll()})
            time.sleep(0.01)
    assert set(results) == set(ids) | {bad_id}
    for request_id, view in ids.items():
        assert results[request_id].ok and results[request_id].view_id == view
        assert np.abs(results[request_id].image - expected).max() <= 1e-6
    assert results[bad_id].error_code == grpc.StatusCode.INVALID_ARGUMENT  # and the stream carried on


APPLIED = "in2n: edits applied "


def test_trainer_edits_every_view_through_ray_and_loses_nothing_when_a_replica_dies(
    ray_server, pretrained, trainer_env, tmp_path
):
    import psutil
    from test_trainer_faults import LogWatcher, applied_in

    out = tmp_path / "out"
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "ray", "--max-num-iterations", "400", "--pipeline.edit-server", ray_server.address,
           "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.edit-rate", "1",
           "--pipeline.instruction", "make it grayscale", "--pipeline.log-every", "10", "--pipeline.max-in-flight", "2",
           "--pipeline.require-server", "True", *QUIET]  # fmt: skip
    trainer = subprocess.Popen(cmd, env=trainer_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = LogWatcher(trainer)
    try:
        replicas = ray_server.replicas()
        assert len(replicas) == 2, ray_server.output()[-3000:]
        log.wait_for(lambda line: applied_in(line) >= 3)
        log.wait_for(lambda line: "edits in flight 2" in line)  # each takes a second: both still there at the kill
        # The trainer's one stream is pinned to one replica: kill that one.
        holder = ray_server.stream_replica()
        busy = next(p for p in replicas if p.pid == holder)
        busy.send_signal(signal.SIGKILL)
        # The stream ends with INTERNAL; the client keeps what was in flight and re-sends it on a new stream.
        broke = log.wait_for(lambda line: "broke (INTERNAL" in line)
        assert "kept to re-send" in broke and " 0 request(s) in flight handed back" in broke, broke
        assert trainer.wait(timeout=600) == 0, "".join(log.seen[-40:])
    finally:
        if trainer.poll() is None:
            trainer.kill()
    report = out / "tiny" / "in2n-tiny" / "ray" / "edit_report"
    stats = json.loads((report / "edit_stats.json").read_text())
    assert stats["edits_failed"] == 0, stats  # the edits lost with the replica were re-sent, none given up
    assert stats["edits_applied"] > 0
    snapshot = np.load(report / "training_images.npz")
    assert (snapshot["edits_per_view"] >= 1).all(), "every view edited through the proxy"
    assert not psutil.pid_exists(busy.pid) or busy.status() == psutil.STATUS_ZOMBIE


# -- the client's side of a replica's death, on a small gRPC server (no Ray needed) ------------------------


def _server_whose_streams_die(after: int, times: int):
    """A real gRPC server of the contract (no health service) that answers each edit with its render, except that
    its first `times` streams read `after` requests, answer none and end with INTERNAL, as a Ray Serve stream does
    when its replica dies."""
    from concurrent import futures

    from protos.in2n.v1 import edit_service_pb2 as pb
    from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

    class DyingStreams(pb_grpc.EditServiceServicer):
        def __init__(self) -> None:
            self.streams = 0

        def Describe(self, request, context):
            return pb.DescribeResponse(backend="echo", caches_originals=False)

        def StreamEdit(self, request_iterator, context):
            self.streams += 1
            if self.streams <= times:
                for _ in range(after):
                    next(request_iterator)
                context.abort(grpc.StatusCode.INTERNAL, "replica died")
            for request in request_iterator:
                edit = request.edit
                yield pb.StreamEditResponse(request_id=edit.request_id, view_id=edit.view_id,
                                            edited=pb.EditResponse(request_id=edit.request_id, view_id=edit.view_id,
                                                                   edited=edit.render))  # fmt: skip

    servicer = DyingStreams()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_EditServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


def _collect(client, count: int, timeout_s: float = 60.0) -> list:
    deadline = time.monotonic() + timeout_s
    results = []
    while len(results) < count:
        assert time.monotonic() < deadline, f"{len(results)} of {count} results"
        results += client.poll()
        time.sleep(0.01)
    return results


def _connected(client, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.can_submit():
        assert time.monotonic() < deadline, "not connected"
        time.sleep(0.01)


def test_stream_client_resends_what_a_stream_ended_by_internal_had_no_answer_for():
    from in2n_client import StreamClient
    from in2n_contract import EditParams

    server, servicer, address = _server_whose_streams_die(after=2, times=1)
    rng = np.random.default_rng(1)
    originals = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    try:
        with StreamClient(address, max_in_flight=4) as client:
            _connected(client)  # readiness from Describe: this server has no health service
            for view, original in enumerate(originals):
                client.submit(view, original, original, EditParams(instruction="make it sepia"))
            results = _collect(client, 3)
            assert client.resent >= 2 and client.failed == 0 and servicer.streams == 2
            assert sorted(r.view_id for r in results) == [0, 1, 2] and all(r.ok for r in results)
            for r in results:  # each answer is its own request's
                assert np.array_equal(np.rint(r.image * 255).astype(np.uint8), originals[r.view_id])
    finally:
        server.stop(None)


def test_stream_client_hands_a_request_back_after_two_resends():
    import grpc as grpc_module

    from in2n_client import MAX_RESENDS, StreamClient
    from in2n_contract import EditParams

    server, servicer, address = _server_whose_streams_die(after=1, times=MAX_RESENDS + 1)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    try:
        with StreamClient(address, max_in_flight=1) as client:
            _connected(client)
            client.submit(0, image, image, EditParams(instruction="make it sepia"))
            (result,) = _collect(client, 1)
            assert result.error_code == grpc_module.StatusCode.UNAVAILABLE and "INTERNAL" in result.error_message
            assert client.resent == MAX_RESENDS and servicer.streams >= MAX_RESENDS + 1
            _connected(client)  # and the next stream serves
            client.submit(1, image, image, EditParams(instruction="make it sepia"))
            (result,) = _collect(client, 1)
            assert result.ok and result.view_id == 1
    finally:
        server.stop(None)

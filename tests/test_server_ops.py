"""Operations of the diffusion server over real gRPC: deadlines, cancellation, draining, batching,
originals sent once, bearer token, TLS, metrics, JSON logs, size limits, start-up errors.

In-process servers (testing_support.InProcessServer) with small test backends where a test needs a backend that
blocks on cue; real `python -m diffusion_server` subprocesses for the command line. gRPC itself is
never mocked; waiting is a poll on observable state with a deadline.
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_client import collect, wait_until
from test_palette import random_image
from test_server import OpenStream, assert_one_line_error, decoded, edit_request, run_server_cli

from diffusion_server.backends.base import BackendInfo, EditBackend, EditResult
from diffusion_server.backends.identity import IdentityBackend
from diffusion_server.server import shutdown
from in2n_client import EditClient, EditFailed, StreamClient, original_key
from in2n_contract import EditParams, codec
from protos.in2n.v1 import edit_service_pb2 as pb
from testing_support import GateBackend, InProcessServer, free_port

OK = "edited"


@pytest.fixture
def make_server() -> Iterator[Callable[..., InProcessServer]]:
    servers: list[InProcessServer] = []

    def make(backend: EditBackend | None = None, **config: object) -> InProcessServer:
        servers.append(InProcessServer(backend or GateBackend(), **config))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def metric(server: InProcessServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def one_running_one_queued(make_server, queued: str = "queued") -> tuple:
    """A gate server with edit "w" blocked in the backend and `queued` (its id and instruction) waiting behind
    it, both sent on one stream: (server, stream)."""
    s = make_server()
    stream = OpenStream(s.stub)
    stream.send(edit_request("w", "wait"))
    stream.send(edit_request(queued, queued))
    assert s.backend.started.wait(30)
    wait_until(lambda: s.servicer.worker.pending == 2, "both edits accepted")
    return s, stream


# -- deadlines and cancellation ------------------------------------------------------------------


def test_expired_unary_request_is_not_computed(make_server) -> None:
    s = make_server()
    blocker = s.stub.Edit.future(edit_request("w", "wait"), timeout=30)
    assert s.backend.started.wait(30)
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Edit(edit_request("late", "late"), timeout=0.2)  # queued behind "wait" until its deadline passes
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    s.backend.gate.set()
    assert blocker.result().request_id == "w"
    assert (
        s.stub.Edit(edit_request("after", "after"), timeout=30).request_id == "after"
    )  # FIFO: "late" was handled before
    assert s.backend.edited == ["wait", "after"]
    wait_until(
        lambda: metric(s, "in2n_requests_total", method="Edit", code="DEADLINE_EXCEEDED") == 1, "the expiry was counted"
    )


def test_stream_request_timeout_ms_gives_deadline_exceeded(make_server) -> None:
    s = make_server()
    stream = OpenStream(s.stub)
    stream.send(edit_request("w", "wait"))
    stream.send(edit_request("late", "late", timeout_ms=1))
    assert s.backend.started.wait(30)
    wait_until(lambda: s.servicer.worker.pending == 2, "the timed request is queued")
    arrived = time.monotonic()
    wait_until(lambda: time.monotonic() > arrived + 0.01, "its 1 ms budget is spent")
    s.backend.gate.set()
    responses = {r.request_id: r for r in [stream.receive(), stream.receive()]}
    assert responses["w"].WhichOneof("outcome") == OK
    assert responses["late"].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "not computed" in responses["late"].error.message
    assert s.backend.edited == ["wait"]
    assert stream.half_close() == []


def test_cancelled_requests_cost_no_compute(make_server) -> None:
    s, stream = one_running_one_queued(make_server, "dropped-stream")
    unary = s.stub.Edit.future(edit_request("dropped-unary", "dropped-unary"), timeout=30)
    wait_until(lambda: s.servicer.worker.pending == 3, "the unary request is queued too")
    stream.cancel()
    unary.cancel()
    wait_until(lambda: s.servicer.worker.pending == 1, "the cancelled requests left the queue")
    s.backend.gate.set()
    assert s.stub.Edit(edit_request("after", "after"), timeout=30).request_id == "after"
    assert s.backend.edited == ["wait", "after"]


# -- draining ------------------------------------------------------------------------------------


def test_shutdown_finishes_accepted_edits_then_ends_streams(make_server) -> None:
    s, stream = one_running_one_queued(make_server)
    outcome: queue.Queue[bool] = queue.Queue()
    stopper = threading.Thread(target=lambda: outcome.put(shutdown(s.server, s.servicer, s.health, grace_s=30)))
    stopper.start()

    def refused() -> bool:
        try:
            s.stub.Edit(edit_request("new", "new"), timeout=5)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
        return False

    wait_until(refused, "new edits are refused while draining")
    health = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    s.backend.gate.set()
    rest = list(stream.call)  # the server answers both, then ends the stream by itself
    assert sorted(r.request_id for r in rest) == ["queued", "w"]
    assert all(r.WhichOneof("outcome") == OK for r in rest)
    assert outcome.get(timeout=30) is True
    stopper.join(30)
    assert s.backend.edited == ["wait", "queued"]


def test_shutdown_gives_up_after_the_grace_period(make_server) -> None:
    s, _stream = one_running_one_queued(make_server)
    assert shutdown(s.server, s.servicer, s.health, grace_s=0.2) is False  # the gate never opened
    s.backend.gate.set()
    assert "queued" not in s.backend.edited


# -- batching ------------------------------------------------------------------------------------


def test_worker_gathers_a_batch(make_server) -> None:
    s = make_server(GateBackend(batching=True), max_batch=4, max_delay_ms=10_000)
    requests = [pb.StreamEditRequest(edit=edit_request(f"b{i}", f"b{i}", random_image(i))) for i in range(4)]
    responses = {r.request_id: r for r in s.stub.StreamEdit(iter(requests), timeout=60)}
    assert s.backend.batch_sizes == [4]  # all four in one call (it closes as soon as the batch is full)
    for i in range(4):
        np.testing.assert_array_equal(decoded(responses[f"b{i}"].edited), random_image(i))
    assert metric(s, "in2n_batch_size_sum") == 4 and metric(s, "in2n_batch_size_count") == 1
    assert s.stub.Describe(pb.DescribeRequest(), timeout=5).max_batch == 4


def test_backend_without_batching_is_called_one_by_one(make_server) -> None:
    s = make_server(GateBackend(batching=False), max_batch=4, max_delay_ms=10_000)
    requests = [pb.StreamEditRequest(edit=edit_request(f"b{i}", f"b{i}")) for i in range(3)]
    assert len(list(s.stub.StreamEdit(iter(requests), timeout=60))) == 3
    assert s.backend.batch_sizes == [] and s.backend.edited == ["b0", "b1", "b2"]
    assert s.stub.Describe(pb.DescribeRequest(), timeout=5).max_batch == 1


@pytest.fixture(scope="module")
def tiny_backend() -> Iterator[EditBackend]:
    """One tiny random IP2P for this module's in-process servers (one torch thread while it lives)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusion_server.backends.tiny_ip2p import build_tiny_ip2p

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_tiny_ip2p(seed=0)
    finally:
        torch.set_num_threads(threads)


def test_tiny_ip2p_batched_over_grpc_equals_alone(make_server, tiny_backend) -> None:
    backend = tiny_backend
    s = make_server(backend, max_batch=3, max_delay_ms=10_000)
    fields = [{"seed": 1}, {"seed": 2, "guidance_scale": 2.0}, {"seed": 3, "lower_bound": 0.6}]
    texts = ["turn it red", "make it night", "turn it red"]
    requests = [
        pb.StreamEditRequest(
            edit=edit_request(f"t{i}", texts[i], random_image(20 + i, 16, 16), diffusion_steps=2, **fields[i])
        )
        for i in range(3)
    ]
    responses = {r.request_id: r for r in s.stub.StreamEdit(iter(requests), timeout=120)}
    assert metric(s, "in2n_batch_size_count") == 1 and metric(s, "in2n_batch_size_sum") == 3
    for i in range(3):
        req = requests[i].edit
        alone = backend.edit(
            codec.decode_image(req.render, "render"),
            codec.decode_image(req.original, "original"),
            EditParams(texts[i], diffusion_steps=2, **fields[i]),
        )
        assert responses[f"t{i}"].edited.timestep == alone.timestep
        np.testing.assert_allclose(decoded(responses[f"t{i}"].edited), alone.image, rtol=0, atol=1e-5)


# -- originals sent once ---------------------------------------------------------------------------


def _cached(
    request_id: str,
    view_id: int,
    key: str,
    with_original: bool,
    render: np.ndarray,
    original: np.ndarray,
    client_id: str = "c1",
) -> pb.EditRequest:
    request = edit_request(request_id, "original", render, original, view_id=view_id)
    request.client_id, request.original_key = client_id, key
    if not with_original:
        request.ClearField("original")
    return request


def test_original_cache_contract(make_server) -> None:
    s = make_server()
    render, original = random_image(1, 8, 8), random_image(2, 8, 8)
    k1, k2 = original_key(original), original_key(render)  # the key of the original sent, another image's key
    with pytest.raises(grpc.RpcError) as info:  # never sent: a defined miss
        s.stub.Edit(_cached("m", 3, k1, False, render, original), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and info.value.details().startswith(
        "original not cached"
    )
    first = s.stub.Edit(_cached("a", 3, k1, True, render, original), timeout=10)
    np.testing.assert_array_equal(decoded(first), original)
    again = s.stub.Edit(_cached("b", 3, k1, False, render, original), timeout=10)  # only the render travels
    np.testing.assert_array_equal(decoded(again), original)  # the backend got the cached original
    for request in (
        _cached("other-key", 3, k2, False, render, original),
        _cached("other-view", 4, k1, False, render, original),
        _cached("other-client", 3, k1, False, render, original, client_id="c2"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Edit(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, request.request_id
    no_client = _cached("x", 3, k1, False, render, original, client_id="")
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Edit(no_client, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "client_id" in info.value.details()
    assert s.stub.Describe(pb.DescribeRequest(), timeout=5).caches_originals


class DtypeRecorder(EditBackend):
    """Edit = the render as given; records the dtypes and writability of the images it was given."""

    def __init__(self, accepts_uint8: bool) -> None:
        self.accepts_uint8 = accepts_uint8
        self.seen: list[tuple] = []

    def info(self) -> BackendInfo:
        return BackendInfo(model="dtypes", device="cpu", precision="fp32")

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        self.seen.append((render.dtype, original.dtype, render.flags.writeable))
        return EditResult(image=render, timestep=1)


@pytest.mark.parametrize("accepts_uint8", [False, True])
def test_images_reach_the_backend_as_sent_only_when_it_accepts_uint8(make_server, accepts_uint8: bool) -> None:
    """uint8 travels to a backend with accepts_uint8 as a read-only view of the request (no copy, no
    conversion), and back as it is; the others get float32. Either way the numbers are exact."""
    backend = DtypeRecorder(accepts_uint8)
    s = make_server(backend)
    render, original = (np.rint(random_image(seed, 16, 12) * 255).astype(np.uint8) for seed in (3, 4))
    reply = s.stub.Edit(edit_request("u8", "x", render, original), timeout=10)
    assert reply.edited.dtype == pb.DTYPE_UINT8
    np.testing.assert_array_equal(np.frombuffer(reply.edited.data, np.uint8).reshape(render.shape), render)
    u8, f32 = np.dtype(np.uint8), np.dtype(np.float32)
    assert backend.seen[-1] == ((u8, u8, False) if accepts_uint8 else (f32, f32, True))
    floats = random_image(5, 16, 12)
    reply = s.stub.Edit(edit_request("f32", "x", floats, floats), timeout=10)
    assert backend.seen[-1][:2] == (f32, f32)
    np.testing.assert_array_equal(decoded(reply), floats)


def test_a_uint8_edit_answers_a_float_request_in_float() -> None:
    """A backend with accepts_uint8 may return uint8; a float32 request still gets float32, x / 255."""
    from diffusion_server.worker import encode_output

    edited = np.rint(random_image(6, 5, 7) * 255).astype(np.uint8)
    as_float = codec.decode_image(encode_output(edited, edited.shape, uint8_out=False), "edited")
    np.testing.assert_array_equal(as_float, edited.astype(np.float32) / np.float32(255))
    as_sent = codec.decode_image(encode_output(edited, edited.shape, uint8_out=True), "edited", keep_uint8=True)
    np.testing.assert_array_equal(as_sent, edited)


@pytest.mark.parametrize("side,expect_misses", [(64, False), (300, True)], ids=["fits", "evicted"])
def test_stream_client_sends_originals_once_and_recovers_from_misses(
    make_server, side: int, expect_misses: bool
) -> None:
    # 1 MiB of cache: two 64x64 float32 originals fit; one 300x300 (1.08 MB) never does, so every
    # request sent without its original misses and the client must re-send it by itself.
    s = make_server(original_cache_mb=1)
    originals = {view: random_image(view, side, side) for view in (0, 1)}
    params = EditParams("original")
    with StreamClient(s.address, max_in_flight=2) as client:
        wait_until(client.can_submit, "connected")
        for round_ in range(3):
            ids = {
                client.submit(view, random_image(10 + view, side, side), originals[view], params): view
                for view in (0, 1)
            }
            results = collect(client, 2)
            assert set(results) == set(ids)
            for rid, result in results.items():
                assert result.ok, result.error_message
                np.testing.assert_array_equal(result.image, originals[ids[rid]])
        if expect_misses:
            assert client.cache_misses == 4 and client.originals_sent == 6
        else:
            assert client.cache_misses == 0 and client.originals_sent == 2
        assert client.completed == 6 and client.failed == 0


def test_stream_client_resends_a_changed_original(make_server) -> None:
    s = make_server()
    with StreamClient(s.address, max_in_flight=1) as client:
        wait_until(client.can_submit, "connected")
        for seed in (1, 1, 2):
            original = random_image(seed, 8, 8)
            client.submit(0, random_image(5, 8, 8), original, EditParams("original"))
            [result] = collect(client, 1).values()
            np.testing.assert_array_equal(result.image, original)
        assert client.originals_sent == 2 and client.cache_misses == 0


# -- token and TLS ---------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple:
    crypto = pytest.importorskip("cryptography")  # noqa: F841
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_token_required_except_for_health(make_server) -> None:
    s = make_server(IdentityBackend(), token="s3cret")
    for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Edit(edit_request("r"), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(s.stub.StreamEdit(iter([pb.StreamEditRequest(edit=edit_request("r"))]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with EditClient(s.address, timeout_s=10, token="s3cret") as client:
        render = random_image(3)
        np.testing.assert_array_equal(client.edit(render, random_image(4), EditParams("x")).image, render)
    with EditClient(s.address, timeout_s=10) as client:
        with pytest.raises(EditFailed) as failed:
            client.describe()
        assert failed.value.code == grpc.StatusCode.UNAUTHENTICATED
    with StreamClient(s.address, token="s3cret") as client:
        wait_until(client.can_submit, "connected")
        client.submit(0, random_image(5), random_image(6), EditParams("x"))
        [result] = collect(client, 1).values()
        assert result.ok, result.error_message
    assert metric(s, "in2n_requests_total", method="Edit", code="UNAUTHENTICATED") == 3


def test_token_from_environment(make_server, monkeypatch) -> None:
    monkeypatch.setenv("IN2N_TOKEN", "from-env")
    s = make_server(IdentityBackend())
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Describe(pb.DescribeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert s.stub.Describe(pb.DescribeRequest(), timeout=10, metadata=(("authorization", "Bearer from-env"),)).backend


def test_tls_with_token(make_server, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    s = make_server(IdentityBackend(), tls_cert=cert, tls_key=key, token="t0k")
    render = random_image(7)
    with EditClient(s.address, timeout_s=10, token="t0k", root_cert=cert) as client:
        client.wait_ready(timeout_s=10)
        np.testing.assert_array_equal(client.edit(render, random_image(8), EditParams("x")).image, render)
    with StreamClient(s.address, token="t0k", root_cert=cert.read_bytes()) as client:
        wait_until(client.can_submit, "connected over TLS")
        client.submit(0, render, random_image(8), EditParams("x"))
        [result] = collect(client, 1).values()
        np.testing.assert_array_equal(result.image, render)
    with EditClient(s.address, timeout_s=3, token="t0k") as plaintext:  # a plaintext client gets nowhere
        with pytest.raises(EditFailed) as failed:
            plaintext.describe()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE


# -- size limits -----------------------------------------------------------------------------------


def test_side_over_the_limit_is_a_clear_error(make_server) -> None:
    s = make_server(IdentityBackend())
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Edit(edit_request("big", "x", np.zeros((2049, 4, 3), np.uint8)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2049x4" in info.value.details() and "2048" in info.value.details()


def test_message_over_the_limit(make_server) -> None:
    s = make_server(IdentityBackend(), max_image_side=64)  # message limit: two 64x64 float32 images + 4 MiB
    big = np.zeros((1200, 1200, 3), np.float32)  # 17 MB
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Edit(edit_request("huge", "x", big, big), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with (
        EditClient(s.address, max_message_bytes=1 << 20) as client,
        pytest.raises(ValueError, match="over the message limit"),
    ):
        client.edit(big, big, EditParams("x"))


# -- the command line: metrics, JSON logs, SIGTERM, start-up errors --------------------------------


def test_cli_metrics_json_logs_and_sigterm(edit_server_factory) -> None:
    port = free_port()
    server = edit_server_factory(
        "palette",
        extra_args=["--metrics-port", str(port), "--log-format", "json", "--log-level", "info", "--grace-s", "5"],
    )
    with EditClient(server.address, timeout_s=30) as client:
        client.edit(random_image(1), random_image(2), EditParams("make it sepia"))
        with pytest.raises(EditFailed):
            client.edit(random_image(1), random_image(2), EditParams("paint it like Monet"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['in2n_requests_total{code="OK",method="Edit"}']) == 1
    assert float(samples['in2n_requests_total{code="INVALID_ARGUMENT",method="Edit"}']) == 1
    assert float(samples["in2n_edits_total"]) == 1 and float(samples["in2n_queue_depth"]) == 0
    assert float(samples['in2n_edit_latency_seconds_count{stage="total"}']) == 1
    assert float(samples["in2n_batch_size_count"]) == 1
    assert server.stop() == 0
    lines = [line for line in server.output().splitlines() if line.strip()]
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    assert objects[0]["event"] == "serving" and objects[0]["port"] == server.port and objects[0]["metrics_port"] == port
    [rejected] = [o for o in objects if o.get("event") == "rejected"]
    assert rejected["level"] == "info" and rejected["code"] == "INVALID_ARGUMENT" and "Monet" in rejected["msg"]
    assert any(o.get("msg", "").startswith("stopped") for o in objects)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--tls-cert", "cert.pem"], ["--tls-cert", "--tls-key"]),
        (["--tls-cert", "/no/such.pem", "--tls-key", "/no/such.key"], ["/no/such.pem"]),
        (["--compile"], ["--compile", "palette"]),
        (["--max-batch", "0"], ["--max-batch"]),
    ],
    ids=["cert-without-key", "missing-cert", "compile-on-palette", "zero-batch"],
)
def test_startup_errors_are_one_line(child_env: dict, args: list[str], words: list[str]) -> None:
    result = run_server_cli(["--backend", "palette", "--device", "cpu", "--port", "0", *args], child_env)
    assert_one_line_error(result, *words)


def test_busy_metrics_port_is_one_line(child_env: dict) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        result = run_server_cli(
            ["--backend", "palette", "--device", "cpu", "--port", "0", "--metrics-port", str(sock.getsockname()[1])],
            child_env,
        )
    assert_one_line_error(result, "--metrics-port")


def test_cpu_offload_needs_cuda(child_env: dict) -> None:
    pytest.importorskip("diffusers")
    result = run_server_cli(["--backend", "tiny-ip2p", "--device", "cpu", "--port", "0", "--cpu-offload"], child_env)
    assert_one_line_error(result, "--cpu-offload", "CUDA")


def test_cancelled_running_ip2p_edit_stops_between_steps(make_server, tiny_backend) -> None:
    backend = tiny_backend
    s = make_server(backend)
    before = backend.unet_steps_run
    stream = OpenStream(s.stub)
    long_edit = {"diffusion_steps": 200, "lower_bound": 0.999, "upper_bound": 0.999, "seed": 1}  # T = 999: 200 steps
    stream.send(edit_request("long", "turn it red", random_image(1, 8, 8), **long_edit))
    wait_until(lambda: backend.unet_steps_run > before, "the edit is running")
    stream.cancel()
    wait_until(lambda: s.servicer.worker.pending == 0, "the worker let go of the edit")
    assert backend.unet_steps_run - before < 200  # stopped early, not run to the end for nobody
    assert metric(s, "in2n_requests_total", method="StreamEdit", code="CANCELLED") == 1

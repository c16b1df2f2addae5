"""The diffusion server over real gRPC: palette edits, validation, health, reflection, failures, start-up errors.

Most tests talk to one palette server subprocess (`shared_palette_server`) with the raw generated stubs,
so they check the wire contract itself. Tests that need a backend which blocks or fails on cue run an
in-process server (testing_support.InProcessServer) with a small fake backend; gRPC itself is never mocked.
"""

from __future__ import annotations

import importlib.util
import queue
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_palette import expected_look, random_image

from diffusion_server.backends.palette import apply_look
from in2n_client import StreamClient
from in2n_contract import EditParams, codec
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
from testing_support import GateBackend, InProcessServer, free_port

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- helpers -------------------------------------------------------------------------------------


def edit_request(
    request_id: str = "r",
    instruction: str = "make it sepia",
    render: np.ndarray | None = None,
    original: np.ndarray | None = None,
    view_id: int = 0,
    **fields: object,
) -> pb.EditRequest:
    render = random_image(0) if render is None else render
    original = random_image(1, *render.shape[:2]) if original is None else original
    return pb.EditRequest(
        request_id=request_id,
        view_id=view_id,
        render=codec.encode_image(render),
        original=codec.encode_image(original),
        instruction=instruction,
        **fields,
    )


def decoded(response: pb.EditResponse) -> np.ndarray:
    return codec.decode_image(response.edited, "edited")


@pytest.fixture
def channel(shared_palette_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_palette_server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.EditServiceStub:
    return pb_grpc.EditServiceStub(channel)


class OpenStream:
    """A StreamEdit call whose requests are sent one at a time and whose responses are read one at a time."""

    def __init__(self, stub: pb_grpc.EditServiceStub):
        self._requests: queue.Queue[pb.StreamEditRequest | None] = queue.Queue()
        self.call = stub.StreamEdit(iter(self._requests.get, None), timeout=60)

    def send(self, request: pb.EditRequest) -> None:
        self._requests.put(pb.StreamEditRequest(edit=request))

    def receive(self) -> pb.StreamEditResponse:
        return next(self.call)

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(None)  # release gRPC's request-reading thread

    def half_close(self) -> list[pb.StreamEditResponse]:
        """End the requests; return the remaining responses (the server then ends the stream)."""
        self._requests.put(None)
        return list(self.call)


# -- edits ---------------------------------------------------------------------------------------


def test_stream_many_in_flight_matched_by_request_id(stub: pb_grpc.EditServiceStub) -> None:
    looks = {
        "make it sepia": "sepia",
        "turn it red": "red",
        "invert the colors": "invert",
        "make it look like night": "night",
    }
    renders = {f"req-{i}": random_image(10 + i, 5 + i, 8) for i in range(8)}
    instructions = {rid: list(looks)[i % len(looks)] for i, rid in enumerate(renders)}
    requests = [
        pb.StreamEditRequest(edit=edit_request(rid, instructions[rid], render, view_id=100 + i, seed=7))
        for i, (rid, render) in enumerate(renders.items())
    ]
    responses = list(stub.StreamEdit(iter(requests), timeout=60))  # all sent before any answer is read
    assert sorted(r.request_id for r in responses) == sorted(renders)
    for response in responses:
        assert response.WhichOneof("outcome") == "edited", response.error.message
        rid = response.request_id
        assert response.view_id == response.edited.view_id == 100 + list(renders).index(rid)
        assert response.edited.request_id == rid
        image = decoded(response.edited)
        assert image.shape == renders[rid].shape and response.edited.edited.dtype == pb.DTYPE_FLOAT32
        np.testing.assert_allclose(image, expected_look(looks[instructions[rid]], renders[rid]), rtol=0, atol=1e-6)
        t = response.edited.timings
        assert t.queue_ms >= 0 and t.compute_ms >= 0 and t.total_ms >= t.compute_ms


def test_unary_edit_and_defaults(stub: pb_grpc.EditServiceStub) -> None:
    render = random_image(3, 9, 4)
    response = stub.Edit(edit_request("u1", "Make it look like night!", render, view_id=5), timeout=30)
    assert (response.request_id, response.view_id, response.timestep) == ("u1", 5, 0)
    np.testing.assert_allclose(decoded(response), expected_look("night", render), rtol=0, atol=1e-6)


def test_uint8_in_uint8_out(stub: pb_grpc.EditServiceStub) -> None:
    render = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    request = edit_request("u8", "invert the colors", render, np.zeros_like(render))
    response = stub.Edit(request, timeout=30)
    assert response.edited.dtype == pb.DTYPE_UINT8
    out = np.frombuffer(response.edited.data, np.uint8).reshape(6, 5, 3)
    np.testing.assert_array_equal(out, 255 - render)
    [streamed] = list(stub.StreamEdit(iter([pb.StreamEditRequest(edit=request)]), timeout=30))
    assert streamed.edited.edited.dtype == pb.DTYPE_UINT8
    np.testing.assert_array_equal(np.frombuffer(streamed.edited.edited.data, np.uint8).reshape(6, 5, 3), 255 - render)


def test_float16_in_float32_out(stub: pb_grpc.EditServiceStub) -> None:
    render = random_image(4).astype(np.float16)
    response = stub.Edit(edit_request("f16", "make it grayscale", render, render), timeout=30)
    assert response.edited.dtype == pb.DTYPE_FLOAT32
    np.testing.assert_allclose(decoded(response), apply_look("grayscale", render.astype(np.float32)), atol=1e-6)


# -- Describe, health, reflection ----------------------------------------------------------------


def test_describe(stub: pb_grpc.EditServiceStub) -> None:
    d = stub.Describe(pb.DescribeRequest(), timeout=10)
    assert (d.backend, d.model, d.device, d.precision) == ("palette", "", "cpu", "n/a")
    assert (d.max_image_side, d.max_diffusion_steps) == (2048, 1000)
    assert d.max_message_bytes >= 2 * 2048 * 2048 * 3 * 4
    assert "make it sepia" in d.known_instructions and d.server_version == "0.1.0"
    assert d.HasField("defaults") and (d.defaults.guidance_scale, d.defaults.diffusion_steps) == (7.5, 20)
    assert "guidance_scale" in d.ignored_fields and "instruction" not in d.ignored_fields  # palette: a look per text


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "in2n.v1.EditService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"in2n.v1.EditService", "grpc.health.v1.Health"} <= names


# -- validation ----------------------------------------------------------------------------------


def _mutate_render(**changes: object) -> Callable[[pb.EditRequest], None]:
    def apply(req: pb.EditRequest) -> None:
        for name, value in changes.items():
            setattr(req.render, name, value)

    return apply


def _set(**changes: object) -> Callable[[pb.EditRequest], None]:
    def apply(req: pb.EditRequest) -> None:
        for name, value in changes.items():
            setattr(req, name, value)

    return apply


def _wrong_byte_count(req: pb.EditRequest) -> None:
    req.render.data = req.render.data[:-1]


def _size_mismatch(req: pb.EditRequest) -> None:
    req.original.CopyFrom(codec.encode_image(random_image(2, 4, 4)))


def _four_channels(req: pb.EditRequest) -> None:
    req.render.CopyFrom(codec.encode_image(np.zeros((6, 7, 4), np.float32)))


def _out_of_range(req: pb.EditRequest) -> None:
    image = random_image(0)
    image[2, 3, 1] = 1.5
    req.render.CopyFrom(codec.encode_image(image))


def _no_original(req: pb.EditRequest) -> None:
    req.ClearField("original")


# (case id, change to a valid request, words the error message must contain)
BAD_REQUESTS = [
    ("wrong-byte-count", _wrong_byte_count, ["render", "bytes"]),
    ("zero-size", _mutate_render(height=0), ["render", "height"]),
    ("four-channels", _four_channels, ["render", "channels"]),
    ("dtype-unspecified", _mutate_render(dtype=pb.DTYPE_UNSPECIFIED), ["render", "dtype"]),
    ("size-mismatch", _size_mismatch, ["original", "match"]),
    ("no-original", _no_original, ["original", "required"]),
    ("nan-guidance", _set(guidance_scale=float("nan")), ["guidance_scale", "nan"]),
    ("negative-image-guidance", _set(image_guidance_scale=-1.0), ["image_guidance_scale"]),
    ("zero-steps", _set(diffusion_steps=0), ["diffusion_steps"]),
    ("too-many-steps", _set(diffusion_steps=1001), ["diffusion_steps", "1000"]),
    ("lower-above-upper", _set(lower_bound=0.9, upper_bound=0.1), ["lower_bound", "upper_bound"]),
    ("upper-above-one", _set(upper_bound=1.5), ["upper_bound"]),
    ("empty-instruction", _set(instruction="  "), ["instruction"]),
    ("long-instruction", _set(instruction="x" * 1001), ["instruction", "1000"]),
    ("unknown-instruction", _set(instruction="turn him into a statue"), ["unknown instruction", "make it sepia"]),
    ("float-out-of-range", _out_of_range, ["render", "[0, 1]"]),
]


def bad_request(mutate: Callable[[pb.EditRequest], None], request_id: str = "bad") -> pb.EditRequest:
    request = edit_request(request_id)
    mutate(request)
    return request


@pytest.mark.parametrize("mutate,words", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_unary_request_is_invalid_argument(stub: pb_grpc.EditServiceStub, mutate, words: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Edit(bad_request(mutate), timeout=30)
    assert info.value.code() == INVALID
    for word in words:
        assert word in info.value.details()
    assert stub.Edit(edit_request("after"), timeout=30).request_id == "after"  # still serving


@pytest.mark.parametrize("mutate,words", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_stream_request_gets_error_and_stream_stays_open(
    stub: pb_grpc.EditServiceStub, mutate, words: list[str]
) -> None:
    stream = OpenStream(stub)
    stream.send(bad_request(mutate, "bad-1"))
    response = stream.receive()
    assert (response.request_id, response.WhichOneof("outcome")) == ("bad-1", "error")
    assert response.error.code == INVALID.value[0]
    for word in words:
        assert word in response.error.message
    render = random_image(8)
    stream.send(edit_request("good-1", "turn it green", render))
    good = stream.receive()
    assert (good.request_id, good.WhichOneof("outcome")) == ("good-1", "edited")
    np.testing.assert_allclose(decoded(good.edited), expected_look("green", render), atol=1e-6)
    assert stream.half_close() == []


def test_stream_rejects_missing_and_duplicate_request_ids(stub: pb_grpc.EditServiceStub) -> None:
    stream = OpenStream(stub)
    stream.send(edit_request(""))
    response = stream.receive()
    assert response.error.code == INVALID.value[0] and "request_id" in response.error.message
    assert stream.half_close() == []


# -- in-process server with fake backends --------------------------------------------------------


@pytest.fixture
def fake_server() -> Iterator[tuple]:
    with InProcessServer(GateBackend(), max_queued=2) as server:
        yield server.stub, server.backend


def test_responses_come_in_completion_order(fake_server) -> None:
    stub, backend = fake_server
    stream = OpenStream(stub)
    stream.send(edit_request("slow", "wait"))
    stream.send(edit_request("bad", "wait", diffusion_steps=0))
    first = stream.receive()  # the slow edit is still blocked, so the rejection must come first
    assert (first.request_id, first.WhichOneof("outcome")) == ("bad", "error")
    backend.gate.set()
    second = stream.receive()
    assert (second.request_id, second.WhichOneof("outcome")) == ("slow", "edited")
    assert second.edited.timestep == int(0.98 * 999)  # the method default upper bound reached the backend
    assert stream.half_close() == []


def test_backend_exception_is_internal_and_server_keeps_serving(fake_server) -> None:
    stub, _ = fake_server
    with pytest.raises(grpc.RpcError) as info:
        stub.Edit(edit_request("b1", "boom"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INTERNAL and "the GPU caught fire" in info.value.details()
    stream = OpenStream(stub)
    stream.send(edit_request("b2", "boom"))
    response = stream.receive()
    assert response.error.code == grpc.StatusCode.INTERNAL.value[0] and "the GPU caught fire" in response.error.message
    stream.send(edit_request("ok", "anything"))
    assert stream.receive().WhichOneof("outcome") == "edited"
    assert stream.half_close() == []


def test_full_queue_is_resource_exhausted(fake_server) -> None:
    stub, backend = fake_server  # max_queued=2
    stream = OpenStream(stub)
    stream.send(edit_request("q1", "wait"))
    stream.send(edit_request("q2", "x"))
    stream.send(edit_request("q3", "x"))
    refused = stream.receive()
    assert refused.request_id == "q3" and refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    backend.gate.set()
    assert sorted(r.request_id for r in stream.half_close()) == ["q1", "q2"]


def test_cancelled_stream_does_not_wedge_the_server(fake_server) -> None:
    stub, backend = fake_server
    stream = OpenStream(stub)
    stream.send(edit_request("c1", "wait"))
    stream.send(edit_request("c2", "x"))
    assert backend.started.wait(30)
    stream.cancel()
    backend.gate.set()
    assert stub.Edit(edit_request("after-cancel", "x"), timeout=30).request_id == "after-cancel"


# -- process life cycle ----------------------------------------------------------------------------


def run_server_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusion_server", *args], env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("diffusion_server: error:"), result.stderr
    for word in words:
        assert word in last


def test_bad_device_fails_with_one_line(child_env: dict) -> None:
    result = run_server_cli(["--backend", "palette", "--device", "gpu0", "--port", "0"], child_env)
    assert_one_line_error(result, "--device")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_backend_fails_with_one_line(child_env: dict) -> None:
    result = run_server_cli(["--backend", "dalle", "--port", "0"], child_env)
    assert_one_line_error(result, "--backend", "palette")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="ip2p needs diffusers")
def test_missing_weights_fail_with_one_line(child_env: dict, tmp_path) -> None:
    result = run_server_cli(
        ["--backend", "ip2p", "--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--port", "0"], child_env
    )
    assert_one_line_error(result, "no-such-model")


def test_busy_port_fails_with_one_line(child_env: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        result = run_server_cli(
            ["--backend", "palette", "--device", "cpu", "--port", str(sock.getsockname()[1])], child_env
        )
    assert_one_line_error(result, "--port")


def test_unusable_cuda_device_fails_with_one_line(child_env: dict) -> None:
    # cuda:99 fails both without CUDA ("not available; use cpu") and with it ("pick one of them").
    result = run_server_cli(["--backend", "tiny-ip2p", "--device", "cuda:99", "--port", "0"], child_env)
    assert_one_line_error(result, "--device cuda:99")


def test_sigterm_stops_gracefully(edit_server) -> None:
    assert edit_server.stop() == 0
    assert not edit_server.port_file.exists()  # removed on a graceful exit
    assert (
        f"serving palette (model=-, device=cpu, precision=n/a) on 127.0.0.1:{edit_server.port}" in edit_server.output()
    )


# -- a real diffusion backend behind the server ----------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="tiny-ip2p needs diffusers")
def test_tiny_ip2p_behind_the_server_and_sigterm_finishes_the_edit_in_flight(edit_server_factory) -> None:
    from test_client import collect, wait_until

    metrics_port = free_port()
    edit_server = edit_server_factory("tiny-ip2p", extra_args=["--metrics-port", str(metrics_port), "--grace-s", "60"])
    with grpc.insecure_channel(edit_server.address) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        d = stub.Describe(pb.DescribeRequest(), timeout=10)
        assert (d.backend, d.device, d.precision) == ("tiny-ip2p", "cpu", "fp32")
        render = random_image(0, 24, 16)
        fields = {"diffusion_steps": 2, "seed": 5, "lower_bound": 0.3, "upper_bound": 0.6}
        unary = stub.Edit(edit_request("t1", "turn him into a statue", render, **fields), timeout=120)
        assert 300 <= unary.timestep <= 600
        image = decoded(unary)
        assert image.shape == (24, 16, 3) and 0.0 <= image.min() and image.max() <= 1.0
        request = pb.StreamEditRequest(edit=edit_request("t2", "turn him into a statue", render, **fields))
        [streamed] = list(stub.StreamEdit(iter([request]), timeout=120))
        assert streamed.WhichOneof("outcome") == "edited", streamed.error.message
        assert streamed.edited.timestep == unary.timestep  # same seed, same edit
        np.testing.assert_array_equal(decoded(streamed.edited), image)

    # SIGTERM while an edit runs: the edit is finished and answered, then the process exits 0.
    def running() -> bool:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        return "in2n_edits_in_progress 1.0" in text and "in2n_queue_depth 0.0" in text

    with StreamClient(edit_server.address, max_in_flight=1) as client:
        wait_until(client.can_submit, "connected")
        # 8x8 with T = 999 and 100 DDIM steps: about a second, so it is running when SIGTERM lands.
        params = EditParams("turn it red", diffusion_steps=100, lower_bound=0.999, upper_bound=0.999, seed=1)
        client.submit(0, random_image(1, 8, 8), random_image(2, 8, 8), params)
        wait_until(running, "the edit is running")
        edit_server.proc.send_signal(signal.SIGTERM)
        [result] = collect(client, 1, timeout_s=120).values()
    assert result.ok, result.error_message
    assert result.timestep == 999 and result.image.shape == (8, 8, 3)
    assert edit_server.proc.wait(timeout=60) == 0
    assert "stopping: finishing accepted edits" in edit_server.output()

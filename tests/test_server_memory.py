"""The server's memory budget and idle connections (issue 17, item 2).

Small budgets (--max-buffer-mb 4, no originals cache) and 128x128 float32 requests, each counted as 1344 KiB
(`validation.held_bytes`: 7 copies of a 192 KiB image) so that three fit: a unary request that does not fit is refused at once
with RESOURCE_EXHAUSTED naming the flag, a stream that does not fit waits unread (back-pressure) and loses
nothing, a single request larger than the whole budget is refused; then a raw TCP connection that never
opens a call is closed after --connection-idle-timeout-s. In-process servers with a gated backend (the
worker holds the edits until the test opens the gate); waiting is on results and metrics with deadlines.
"""

from __future__ import annotations

import queue
import socket
import time

import grpc
import pytest
from test_client import wait_until
from test_palette import random_image
from test_server import edit_request

from diffusion_server.config import ServerConfig
from protos.in2n.v1 import edit_service_pb2 as pb
from testing_support import GateBackend, InProcessServer

SIDE = 128  # 128x128 float32: 192 KiB an image; a request holds 7 such (sent, decoded, answer x3) = 1344 KiB
BUDGET = {"max_buffer_mb": 4, "original_cache_mb": 0}  # 4 MiB: three requests fit (3.94 MiB), a fourth does not
DEADLINE_S = 30.0


def _request(request_id: str, instruction: str = "x", side: int = SIDE) -> pb.EditRequest:
    image = random_image(3, side, side)
    return edit_request(request_id, instruction, image, image)


def _paused(server: InProcessServer) -> float:
    return server.metrics.registry.get_sample_value("in2n_streams_paused") or 0.0


@pytest.fixture
def gated() -> InProcessServer:
    server = InProcessServer(GateBackend(), **BUDGET)
    yield server
    server.close()


def test_unary_request_beyond_the_budget_is_refused_at_once(gated: InProcessServer) -> None:
    held = [gated.stub.Edit.future(_request("w", "wait"), timeout=DEADLINE_S)]
    assert gated.backend.started.wait(DEADLINE_S)
    held += [gated.stub.Edit.future(_request(f"q{i}"), timeout=DEADLINE_S) for i in range(2)]
    wait_until(lambda: gated.servicer.worker.pending == 3, "three edits held")
    with pytest.raises(grpc.RpcError) as info:
        gated.stub.Edit(_request("over"), timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-buffer-mb" in info.value.details() and "retry later" in info.value.details(), info.value.details()
    gated.backend.gate.set()
    assert sorted(f.result().request_id for f in held) == ["q0", "q1", "w"]
    # The budget is free again once the answers are taken.
    wait_until(lambda: gated.servicer.worker.pending == 0, "the edits answered")
    assert gated.stub.Edit(_request("after"), timeout=DEADLINE_S).request_id == "after"


def test_a_request_larger_than_the_whole_budget_is_refused(gated: InProcessServer) -> None:
    big = _request("big", side=512)  # 7 x 3 MiB: more than the whole 4 MiB
    with pytest.raises(grpc.RpcError) as info:
        gated.stub.Edit(big, timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too large" in info.value.details() and "--max-buffer-mb" in info.value.details(), info.value.details()
    # On a stream: an EditError for that request, and the stream goes on.
    replies = list(
        gated.stub.StreamEdit(
            iter([pb.StreamEditRequest(edit=big), pb.StreamEditRequest(edit=_request("small"))]), timeout=DEADLINE_S
        )
    )
    by_id = {r.request_id: r for r in replies}
    assert by_id["big"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "--max-buffer-mb" in by_id["big"].error.message
    assert by_id["small"].WhichOneof("outcome") == "edited"


def test_a_stream_beyond_the_budget_waits_unread_and_loses_nothing(gated: InProcessServer) -> None:
    requests: queue.Queue[pb.StreamEditRequest | None] = queue.Queue()
    requests.put(pb.StreamEditRequest(edit=_request("s0", "wait")))
    for i in range(1, 6):
        requests.put(pb.StreamEditRequest(edit=_request(f"s{i}")))
    requests.put(None)
    call = gated.stub.StreamEdit(iter(requests.get, None), timeout=DEADLINE_S)
    assert gated.backend.started.wait(DEADLINE_S)
    # Three requests hold the budget; the fourth waits for room, and nothing after it is read.
    wait_until(lambda: _paused(gated) == 1, "the server stops reading the stream")
    assert gated.servicer.worker.pending == 3
    # Meanwhile a unary request finds no room either.
    with pytest.raises(grpc.RpcError) as info:
        gated.stub.Edit(_request("unary"), timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    gated.backend.gate.set()
    responses = list(call)
    assert sorted(r.request_id for r in responses) == [f"s{i}" for i in range(6)]
    assert all(r.WhichOneof("outcome") == "edited" for r in responses)
    assert _paused(gated) == 0
    wait_until(lambda: gated.servicer.budget.used == 0, "every byte of the budget given back")


def test_a_stream_cancelled_with_answers_unsent_gives_its_budget_back(gated: InProcessServer) -> None:
    requests: queue.Queue[pb.StreamEditRequest | None] = queue.Queue()
    requests.put(pb.StreamEditRequest(edit=_request("c0", "wait")))
    requests.put(pb.StreamEditRequest(edit=_request("c1")))
    call = gated.stub.StreamEdit(iter(requests.get, None), timeout=DEADLINE_S)
    assert gated.backend.started.wait(DEADLINE_S)
    wait_until(lambda: gated.servicer.worker.pending == 2, "both edits held")
    assert gated.servicer.budget.used > 0
    call.cancel()
    gated.backend.gate.set()
    requests.put(None)
    wait_until(lambda: gated.servicer.worker.pending == 0, "the edits let go")
    wait_until(lambda: gated.servicer.budget.used == 0, f"the budget given back ({gated.servicer.budget.used})")


def test_budget_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--original-cache-mb"):
        ServerConfig(max_buffer_mb=64, original_cache_mb=64).validate()
    with pytest.raises(ValueError, match="--max-buffer-mb"):
        ServerConfig(max_buffer_mb=0).validate()
    config = ServerConfig(max_buffer_mb=4096)
    assert config.cache_mb == 1024 and ServerConfig(max_buffer_mb=400).cache_mb == 100
    assert ServerConfig().budget_mb >= 64  # the default: a share of this machine's memory


def test_a_raw_idle_tcp_connection_is_closed() -> None:
    """A TCP connection that never opens a call (not even HTTP/2's preface) is closed after
    --connection-idle-timeout-s, where it used to be held for good."""
    server = InProcessServer(GateBackend(), connection_idle_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as sock:
            deadline = time.monotonic() + DEADLINE_S
            closed = False
            while time.monotonic() < deadline:  # what the server sends (its SETTINGS, then GOAWAY), then the end
                if not sock.recv(65536):
                    closed = True
                    break
            assert closed, "the server kept the idle connection"
        # Real clients are unaffected: a call on a fresh channel is served.
        assert server.stub.Edit(_request("after"), timeout=DEADLINE_S).request_id == "after"
    finally:
        server.close()

"""Streams cannot starve or exhaust the server; client ids stay secret (issue 9, items 1, 2 and 5).

Real `python -m diffusion_server` processes on 127.0.0.1 (ephemeral ports), real gRPC clients:

- hundreds of idle StreamEdit streams: health, Describe, Edit are still answered, streams beyond
  --max-streams get RESOURCE_EXHAUSTED at once, a freed slot takes a new stream; with a high
  --max-streams, 300 idle streams held open at once still starve nobody (no thread per stream);
- a stream idle longer than --stream-idle-timeout-s is closed with UNAVAILABLE (and one whose edit
  is still running is not); so is one whose client sends requests but reads no response for that long;
- a client that floods one stream and never reads: the server stops reading it (back-pressure), its
  memory stays bounded, and comes back near the baseline once the client cancels;
- an original whose original_key does not match it is refused; client ids never appear in clear in
  messages or logs.

Waiting is on RPC results with deadlines, or a poll of the server's metrics with a deadline; no sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import re
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_client import collect, wait_until
from test_palette import random_image
from test_server import assert_one_line_error, decoded, edit_request, run_server_cli

from in2n_client import StreamClient, original_key
from in2n_contract import STREAM_IDLE, EditParams
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
from testing_support import GateBackend, InProcessServer, free_port, rss_bytes

IDLE_STREAMS = 300
MAX_STREAMS = 40
RPC_TIMEOUT_S = 30.0


def _small_edit(request_id: str) -> pb.EditRequest:
    return edit_request(request_id, "make it sepia", random_image(3, 8, 8), random_image(4, 8, 8))


def _metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_0-9]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


# -- item 1: open streams starve nobody ---------------------------------------------------------------


async def _idle_streams_scenario(address: str, metrics_port: int, max_streams: int, count: int) -> None:
    """Open `count` idle streams on a server with --max-streams `max_streams`: those beyond the limit are
    refused at once, the others stay open, and every other caller is still answered."""
    refused_expected = max(0, count - max_streams)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        calls = [stub.StreamEdit(timeout=120) for _ in range(count)]  # none sends anything
        ends = {asyncio.ensure_future(call.code()): call for call in calls}
        # The streams beyond the limit are refused at once: wait for each end as it comes, until that many have
        # ended, with a deadline (the accepted streams never end by themselves).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RPC_TIMEOUT_S
        finished: set = set()
        pending = set(ends)
        while len(finished) < refused_expected and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            finished |= done
        assert len(finished) == refused_expected, f"{len(finished)} streams ended, expected {refused_expected}"
        for task in finished:
            assert task.result() == grpc.StatusCode.RESOURCE_EXHAUSTED, task.result()
            details = await ends[task].details()
            assert "--max-streams" in details and str(max_streams) in details, details
        # The others are open on the server, each waiting for its client.
        accepted = count - refused_expected
        await asyncio.to_thread(wait_until, lambda: _metrics(metrics_port).get("in2n_streams_open") == accepted,
                                f"the server holds {accepted} open streams")  # fmt: skip
        assert not any(task.done() for task in pending)
        open_calls = [ends[task] for task in pending]

        # With that many streams open and idle, every other caller is still answered.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        described = await stub.Describe(pb.DescribeRequest(), timeout=10)
        assert described.backend == "palette"
        edited = await stub.Edit(_small_edit("unary"), timeout=RPC_TIMEOUT_S)
        assert edited.request_id == "unary" and edited.edited.height == 8
        if accepted == max_streams:  # at the limit: one more is refused, until a stream ends and frees its slot
            one_more = stub.StreamEdit(timeout=RPC_TIMEOUT_S)
            assert await one_more.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await open_calls[0].done_writing()
            assert await open_calls[0].code() == grpc.StatusCode.OK
            open_calls = open_calls[1:]
        fresh = stub.StreamEdit(timeout=RPC_TIMEOUT_S)  # below the limit: a new stream is served at once
        await fresh.write(pb.StreamEditRequest(edit=_small_edit("fresh")))
        response = await fresh.read()
        assert response.request_id == "fresh" and response.WhichOneof("outcome") == "edited"
        await fresh.done_writing()
        assert await fresh.code() == grpc.StatusCode.OK
        for call in open_calls:
            call.cancel()


@pytest.mark.parametrize(
    "max_streams,count",
    [(MAX_STREAMS, IDLE_STREAMS), (1000, IDLE_STREAMS)],
    ids=["beyond-the-limit-refused", "hundreds-accepted"],
)
def test_hundreds_of_idle_streams_starve_nobody(edit_server_factory, max_streams: int, count: int) -> None:
    """With --max-streams 40, 260 of 300 idle streams are refused at once; with --max-streams 1000, all 300 are
    accepted and held open at once (no thread each: health, Describe, Edit and a new stream are still answered)."""
    metrics_port = free_port()
    server = edit_server_factory(extra_args=["--max-streams", str(max_streams), "--metrics-port", str(metrics_port)])
    asyncio.run(_idle_streams_scenario(server.address, metrics_port, max_streams, count))
    assert server.proc is not None and server.proc.poll() is None
    assert "Traceback" not in server.output()


async def _idle_timeout_scenario(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        silent = stub.StreamEdit(timeout=RPC_TIMEOUT_S)  # opens and sends nothing
        busy = stub.StreamEdit(timeout=RPC_TIMEOUT_S)
        # An edit that runs longer than the idle timeout: the stream is not idle while it is in flight.
        await busy.write(pb.StreamEditRequest(edit=_small_edit("slow")))
        response = await busy.read()
        assert response.request_id == "slow" and response.WhichOneof("outcome") == "edited"
        for call in (silent, busy):
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            details = await call.details()
            assert details.startswith(STREAM_IDLE) and "--stream-idle-timeout-s" in details, details


def test_idle_stream_is_closed_with_unavailable(edit_server_factory) -> None:
    # identity with --delay-ms 1500: each edit takes 1.5 s, three times the idle timeout.
    server = edit_server_factory(
        backend="identity", extra_args=["--delay-ms", "1500", "--stream-idle-timeout-s", "0.5"]
    )
    asyncio.run(_idle_timeout_scenario(server.address))
    assert "Traceback" not in server.output()


def test_the_client_takes_an_idle_close_calmly_and_edits_on(edit_server_factory, caplog) -> None:
    """The server closing an idle stream with nothing in flight is routine: the client says so at INFO (not
    WARNING), hands nothing back as failed, and its next edit goes through on a new stream."""
    server = edit_server_factory(backend="identity", extra_args=["--stream-idle-timeout-s", "0.5"])
    image = random_image(16, 16)
    caplog.set_level(logging.INFO, logger="in2n_client.stream_client")
    with StreamClient(server.address, max_in_flight=1) as client:
        wait_until(client.can_submit, "the client connected")
        first = client.submit(0, image, image, EditParams("x"))
        assert collect(client, 1)[first].image is not None

        def closed_for_idleness() -> bool:
            return any(STREAM_IDLE in r.getMessage() for r in caplog.records)

        wait_until(closed_for_idleness, "the server closed the idle stream")
        idle_records = [r for r in caplog.records if STREAM_IDLE in r.getMessage()]
        assert all(r.levelno == logging.INFO for r in idle_records), [
            (r.levelname, r.getMessage()) for r in idle_records
        ]
        wait_until(client.can_submit, "the client reconnected")
        second = client.submit(1, image, image, EditParams("x"))
        results = collect(client, 1)
        assert results[second].image is not None and client.failed == 0


# -- item 2: a client that never reads ----------------------------------------------------------------

FLOOD_REQUESTS = 400
FLOOD_SIDE = 256  # 256x256 float32: 786 KiB an image, 1.5 MiB a request
FLOOD_GROWTH_LIMIT = 160 << 20  # unbounded, 400 answers of 786 KiB alone are over 300 MiB
AFTER_GROWTH_LIMIT = 64 << 20


def _answered_on_streams(values: dict) -> float:
    return sum(v for k, v in values.items() if k.startswith("in2n_requests_total{") and 'method="StreamEdit"' in k)


def test_a_client_that_never_reads_cannot_grow_server_memory(edit_server_factory) -> None:
    metrics_port = free_port()
    server = edit_server_factory(extra_args=["--metrics-port", str(metrics_port)])
    render, original = random_image(5, FLOOD_SIDE, FLOOD_SIDE), random_image(6, FLOOD_SIDE, FLOOD_SIDE)

    def request(i: int) -> pb.StreamEditRequest:
        return pb.StreamEditRequest(edit=edit_request(f"f{i}", "make it sepia", render, original))

    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        # Warm-up: the same traffic, read as it comes (allocator, gRPC buffers, threads at their working size).
        warm = list(stub.StreamEdit((request(i) for i in range(40)), timeout=120))
        assert len(warm) == 40 and all(r.WhichOneof("outcome") == "edited" for r in warm)
        baseline = rss_bytes(server.proc.pid)

        sent: queue.Queue[int] = queue.Queue()

        def flood() -> Iterator[pb.StreamEditRequest]:
            for i in range(FLOOD_REQUESTS):
                yield request(i)
                sent.put(i)

        call = stub.StreamEdit(flood(), timeout=300)  # its responses are never read

        def server_stopped_taking() -> bool:
            values = _metrics(metrics_port)
            # Bounded: the server stopped reading this stream. Unbounded: it read and answered everything.
            return values.get("in2n_streams_paused", 0) >= 1 or _answered_on_streams(values) >= 40 + FLOOD_REQUESTS

        wait_until(server_stopped_taking, "the server stops taking the flood", timeout_s=240)
        flooding = rss_bytes(server.proc.pid)
        read_by_server = _answered_on_streams(_metrics(metrics_port)) - 40
        print(f"server RSS: baseline {baseline / 2**20:.0f} MiB, flooding {flooding / 2**20:.0f} MiB; "
              f"{sent.qsize()} requests sent, {read_by_server:.0f} answered")  # fmt: skip
        assert flooding - baseline < FLOOD_GROWTH_LIMIT, (
            f"server RSS grew by {(flooding - baseline) / 2**20:.0f} MiB while flooded"
        )
        assert sent.qsize() < FLOOD_REQUESTS  # the client was held back: its requests waited on its side
        call.cancel()
        wait_until(lambda: _metrics(metrics_port).get("in2n_streams_open", 1) == 0, "the server let go of the stream")
        wait_until(lambda: _metrics(metrics_port).get("in2n_edits_in_progress", 1) == 0, "no edit left in the server")
        after = rss_bytes(server.proc.pid)
        print(f"server RSS after cancel {after / 2**20:.0f} MiB")
        assert after - baseline < AFTER_GROWTH_LIMIT, (
            f"server RSS stayed {(after - baseline) / 2**20:.0f} MiB over the baseline"
        )

        # The server still serves, on a new stream.
        reply = list(stub.StreamEdit(iter([pb.StreamEditRequest(edit=_small_edit("after"))]), timeout=RPC_TIMEOUT_S))
        assert [r.request_id for r in reply] == ["after"]
    assert "Traceback" not in server.output()


def test_back_pressure_loses_nothing() -> None:
    """A stream held back (the server stopped reading it) gets every answer once its client reads."""
    server = InProcessServer(GateBackend(), max_stream_backlog=4)
    try:
        render = random_image(7, FLOOD_SIDE, FLOOD_SIDE)  # answers of 786 KiB: the client's receive window fills
        requests: queue.Queue[pb.StreamEditRequest | None] = queue.Queue()
        for i in range(30):
            requests.put(pb.StreamEditRequest(edit=edit_request(f"b{i}", "x", render, render)))
        requests.put(None)
        call = server.stub.StreamEdit(iter(requests.get, None), timeout=120)
        paused = lambda: server.metrics.registry.get_sample_value("in2n_streams_paused") == 1
        wait_until(paused, "the server stops reading the stream")
        responses = list(call)  # now read: the server reads on, and answers everything
        assert sorted(r.request_id for r in responses) == sorted(f"b{i}" for i in range(30))
        assert all(r.WhichOneof("outcome") == "edited" for r in responses)
        assert server.metrics.registry.get_sample_value("in2n_streams_paused") == 0
    finally:
        server.close()


def test_a_stream_whose_client_never_reads_is_closed(edit_server_factory) -> None:
    """A client that sends requests and never reads the responses loses its stream after
    --stream-idle-timeout-s without write progress (its backlog is never 0, so the plain idle clock
    never runs): UNAVAILABLE saying so, and its slot of --max-streams 1 goes to the next stream."""
    metrics_port = free_port()
    server = edit_server_factory(extra_args=["--max-streams", "1", "--stream-idle-timeout-s", "1",
                                             "--metrics-port", str(metrics_port)])  # fmt: skip
    render = random_image(5, FLOOD_SIDE, FLOOD_SIDE)  # answers of 786 KiB: the client's receive window fills

    def requests() -> Iterator[pb.StreamEditRequest]:
        for i in range(FLOOD_REQUESTS):
            yield pb.StreamEditRequest(edit=edit_request(f"n{i}", "make it sepia", render, render))

    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        deaf = stub.StreamEdit(requests(), timeout=300)  # its responses are not read until the end of the test
        wait_until(lambda: _metrics(metrics_port).get("in2n_streams_unread_closed_total", 0) >= 1,
                   "the server closes the stream whose client does not read", timeout_s=120)  # fmt: skip
        # Its slot is free: the next stream is served (with --max-streams 1), while the deaf client still reads nothing.
        reply = list(stub.StreamEdit(iter([pb.StreamEditRequest(edit=_small_edit("next"))]), timeout=RPC_TIMEOUT_S))
        assert [r.request_id for r in reply] == ["next"] and reply[0].WhichOneof("outcome") == "edited"
        wait_until(lambda: _metrics(metrics_port).get("in2n_edits_in_progress", 1) == 0, "no edit left in the server")
        # The deaf client, reading at last, gets what had reached it, then the reason its stream ended.
        with pytest.raises(grpc.RpcError) as info:
            for response in deaf:
                assert response.WhichOneof("outcome") == "edited"
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        details = info.value.details()
        assert "not reading its responses" in details and "--stream-idle-timeout-s" in details, details
        assert not details.startswith(STREAM_IDLE)  # not the routine close of a stream with nothing to do
        assert _metrics(metrics_port).get("in2n_streams_open") == 0
    assert "Traceback" not in server.output()


CLOSE_SIDE = 1024  # 1024x1024 float32: 12 MiB an answer, most of the client's 16 MiB receive window
CLOSE_IDLE_S = 1.0
CLOSE_MARGIN_S = 10.0  # the status must come within the timeout plus this, once the client reads again


def test_a_closed_stream_reaches_a_client_that_stopped_reading(edit_server_factory) -> None:
    """A client that stops reading large answers loses its stream after --stream-idle-timeout-s, and once it
    reads again it gets the answers that had reached it, then UNAVAILABLE saying why, promptly (a bounded
    wait) and not only at its own deadline; the server logs no traceback (the close waits for the write
    gRPC still holds instead of aborting under it)."""
    metrics_port = free_port()
    server = edit_server_factory(
        backend="identity",
        extra_args=["--stream-idle-timeout-s", str(CLOSE_IDLE_S), "--metrics-port", str(metrics_port)],
    )
    render = random_image(6, CLOSE_SIDE, CLOSE_SIDE)
    requests = [pb.StreamEditRequest(edit=edit_request(f"c{i}", "x", render, render)) for i in range(4)]

    def read_all(call: grpc.Call) -> grpc.RpcError | None:
        try:
            for response in call:
                assert response.WhichOneof("outcome") == "edited"
        except grpc.RpcError as e:
            return e
        return None

    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        call = stub.StreamEdit(iter(requests), timeout=60)  # not read until the server has closed it
        wait_until(lambda: _metrics(metrics_port).get("in2n_streams_unread_closed_total", 0) >= 1,
                   "the server closes the stream whose client does not read", timeout_s=30)  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_all, call)
            try:
                error = reading.result(timeout=CLOSE_IDLE_S + CLOSE_MARGIN_S)
            except concurrent.futures.TimeoutError:
                call.cancel()
                raise AssertionError("no status within the timeout and its margin: the close never reached the client")
        assert error is not None, "the stream ended without the server's status"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert "not reading its responses" in error.details() and "--stream-idle-timeout-s" in error.details()
        wait_until(lambda: _metrics(metrics_port).get("in2n_streams_open", 1) == 0, "the server let go of the stream")
    log = server.output()
    assert "Traceback" not in log and "TOO_MANY_OPERATIONS" not in log, log


# -- item 5: originals cache ---------------------------------------------------------------------------


def _with_key(
    request_id: str, render: np.ndarray, original: np.ndarray | None, key: str, client_id: str, view_id: int = 0
) -> pb.EditRequest:
    request = edit_request(request_id, "original", render, render if original is None else original, view_id=view_id)
    request.client_id, request.original_key = client_id, key
    if original is None:
        request.ClearField("original")
    return request


@pytest.fixture
def gate_server() -> Iterator[InProcessServer]:
    server = InProcessServer(GateBackend())  # instruction "original": the edit is the original the backend got
    try:
        yield server
    finally:
        server.close()


def test_original_must_match_its_key(gate_server: InProcessServer) -> None:
    stub = gate_server.stub
    render, mine, forged = random_image(1, 8, 8), random_image(2, 8, 8), random_image(3, 8, 8)
    victim = "victim-client-id"
    key = original_key(mine)
    reply = stub.Edit(_with_key("cache", render, mine, key, victim), timeout=10)
    np.testing.assert_array_equal(decoded(reply), mine)
    # Someone who learnt the victim's id and key tries to replace the cached original with another image.
    for bad_key in (key, "not-a-key", original_key(forged.astype(np.float16))):
        with pytest.raises(grpc.RpcError) as info:
            stub.Edit(_with_key("forge", render, forged, bad_key, victim), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "original_key" in info.value.details() and "does not match" in info.value.details()
    again = stub.Edit(_with_key("again", render, None, key, victim), timeout=10)  # only the render travels
    np.testing.assert_array_equal(decoded(again), mine)  # still the victim's own original
    # The key the client computes matches for every dtype it sends (uint8, float16, float32, float64 as float32).
    for i, image in enumerate(
        (np.rint(mine * 255).astype(np.uint8), mine.astype(np.float16), mine, mine.astype(np.float64))
    ):
        wire = image.astype(np.float32) if image.dtype == np.float64 else image
        request = _with_key(f"dtype{i}", wire, wire, original_key(image), victim, view_id=10 + i)
        assert stub.Edit(request, timeout=10).request_id == f"dtype{i}"


def test_stream_client_originals_in_float64_still_cached(gate_server: InProcessServer) -> None:
    originals = {view: random_image(view, 16, 16).astype(np.float64) for view in (0, 1)}
    with StreamClient(gate_server.address, max_in_flight=2) as client:
        wait_until(client.can_submit, "connected")
        for _ in range(2):
            for view in (0, 1):
                client.submit(view, random_image(9, 16, 16), originals[view], EditParams("original"))
            for result in collect(client, 2).values():
                assert result.ok, result.error_message
                np.testing.assert_array_equal(result.image, originals[result.view_id].astype(np.float32))
        assert client.originals_sent == 2 and client.cache_misses == 0


def test_client_id_is_never_written_in_clear(edit_server_factory) -> None:
    server = edit_server_factory(extra_args=["--log-level", "debug"])
    secret = "5f0c2b8e9d4a4c1fa0b1c2d3e4f5a6b7"
    render = random_image(1, 8, 8)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:  # a cache miss
            stub.Edit(_with_key("miss", render, None, original_key(render), secret), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details()
        assert details.startswith("original not cached") and secret not in details
        requests = [pb.StreamEditRequest(edit=_with_key("stream-miss", render, None, original_key(render), secret)),
                    pb.StreamEditRequest(edit=_with_key("stream-bad", render, render, "wrong", secret))]  # fmt: skip
        replies = list(stub.StreamEdit(iter(requests), timeout=RPC_TIMEOUT_S))
        assert sorted(r.error.code for r in replies) == sorted(
            [grpc.StatusCode.FAILED_PRECONDITION.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        )
        assert all(secret not in r.error.message for r in replies)
    assert server.stop() == 0
    log = server.output()
    assert "original not cached" in log  # the misses were logged ...
    assert secret not in log  # ... without the id
    from diffusion_server.validation import client_tag

    assert client_tag(secret) in details  # a short hash prefix instead: enough to tell clients apart in a log


# -- the options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--max-streams", "0"], "--max-streams"),
        (["--stream-idle-timeout-s", "-1"], "--stream-idle-timeout-s"),
        (["--stream-idle-timeout-s", "nan"], "--stream-idle-timeout-s"),
        (["--max-stream-backlog", "0"], "--max-stream-backlog"),
        (["--rpc-threads", "0"], "--rpc-threads"),
    ],
    ids=["zero-streams", "negative-idle", "nan-idle", "zero-backlog", "zero-threads"],
)
def test_stream_limit_errors_are_one_line(child_env: dict, args: list[str], flag: str) -> None:
    result = run_server_cli(["--backend", "palette", "--device", "cpu", "--port", "0", *args], child_env)
    assert_one_line_error(result, flag)

"""in2n_client against real palette server subprocesses.

Waiting is always a loop on observable state with a deadline (the client never blocks the caller,
so a test has to poll it, as the trainer does); nothing asserts on elapsed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from test_palette import expected_look, random_image

from in2n_client import EditClient, EditFailed, StreamClient, StreamResult
from in2n_contract import EditParams
from testing_support import free_port

DEADLINE_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        time.sleep(0.01)


def collect(client: StreamClient, count: int, timeout_s: float = DEADLINE_S) -> dict[str, StreamResult]:
    """Poll until `count` results have arrived; returns them by request id."""
    results: dict[str, StreamResult] = {}

    def done() -> bool:
        results.update((r.request_id, r) for r in client.poll())
        return len(results) >= count

    wait_until(done, f"{count} results arrived")
    return results


# -- EditClient ----------------------------------------------------------------------------------


def test_edit_client(edit_server_address: str) -> None:
    with EditClient(edit_server_address, timeout_s=30) as client:
        client.wait_ready(timeout_s=30)
        assert client.describe().backend == "palette"
        render = random_image(1, 5, 6)
        reply = client.edit(render, random_image(2, 5, 6), EditParams("make it sepia"), view_id=3, request_id="e1")
        assert (reply.request_id, reply.view_id, reply.timestep) == ("e1", 3, 0)
        assert reply.image.dtype == np.float32
        np.testing.assert_allclose(reply.image, expected_look("sepia", render), atol=1e-6)
        assert set(reply.timings) == {"queue_ms", "compute_ms", "total_ms"}
        with pytest.raises(EditFailed) as info:
            client.edit(render, render, EditParams("paint a moustache"))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown instruction" in info.value.message
        with pytest.raises(EditFailed) as info:
            client.edit(render, render, EditParams("make it sepia", guidance_scale=float("inf")))
        assert "guidance_scale" in info.value.message


def test_wait_ready_times_out_without_server() -> None:
    with EditClient(f"127.0.0.1:{free_port()}") as client, pytest.raises(TimeoutError):
        client.wait_ready(timeout_s=0.5)


# -- StreamClient --------------------------------------------------------------------------------


def test_stream_client_edits(edit_server_address: str) -> None:
    looks = ["make it sepia", "turn it blue", "make it grayscale", "make it look like night", "invert the colors"]
    renders = [random_image(20 + i, 4 + i, 6) for i in range(len(looks))]
    with StreamClient(edit_server_address, max_in_flight=4) as client:
        wait_until(lambda: client.connected, "the client connected")
        sent: dict[str, int] = {}
        view = 0
        deadline = time.monotonic() + DEADLINE_S
        while any(r is not None for r in renders):
            assert time.monotonic() < deadline, "timed out waiting for the edits"
            if len(sent) < len(looks) and client.can_submit():
                request_id = client.submit(view, renders[view], renders[view], EditParams(looks[view]))
                sent[request_id] = view
                view += 1
            assert client.in_flight <= 4
            for result in client.poll():
                assert result.ok, result.error_message
                v = sent[result.request_id]
                assert result.view_id == v
                look = {"make it sepia": "sepia", "turn it blue": "blue", "make it grayscale": "grayscale",
                        "make it look like night": "night", "invert the colors": "invert"}[looks[v]]  # fmt: skip
                np.testing.assert_allclose(result.image, expected_look(look, renders[v]), atol=1e-6)
                assert result.timings["total_ms"] >= result.timings["compute_ms"]
                renders[v] = None  # each view comes back once
        assert (client.completed, client.failed, client.in_flight) == (len(looks), 0, 0)

        # A rejected request comes back as a result; the stream goes on.
        bad = client.submit(9, random_image(1), random_image(1), EditParams("paint a moustache"))
        [result] = collect(client, 1).values()
        assert (result.request_id, result.view_id, result.error_code) == (bad, 9, grpc.StatusCode.INVALID_ARGUMENT)
        assert result.image is None and "unknown instruction" in result.error_message
        good = client.submit(1, random_image(2), random_image(2), EditParams("make it red"))
        assert collect(client, 1)[good].ok
        assert (client.completed, client.failed) == (len(looks) + 1, 1)


def test_submit_refuses_when_not_started_not_connected_or_full(edit_server) -> None:
    image = random_image(0)
    client = StreamClient(f"127.0.0.1:{free_port()}", max_in_flight=2)
    with pytest.raises(RuntimeError, match="start"):
        client.submit(0, image, image, EditParams("make it sepia"))
    client.start()
    try:
        assert not client.can_submit() and not client.connected
        with pytest.raises(RuntimeError, match="not connected"):
            client.submit(0, image, image, EditParams("make it sepia"))
    finally:
        client.close()

    with StreamClient(edit_server.address, max_in_flight=2) as client:
        wait_until(lambda: client.connected, "the client connected")
        with pytest.raises(ValueError, match="render"):
            client.submit(0, image[..., :2], image, EditParams("make it sepia"))
        edit_server.pause()  # nothing can come back while the server is stopped
        try:
            client.submit(0, image, image, EditParams("make it sepia"))
            client.submit(1, image, image, EditParams("make it sepia"))
            assert client.in_flight == 2 and not client.can_submit()
            with pytest.raises(RuntimeError, match="in flight"):
                client.submit(2, image, image, EditParams("make it sepia"))
        finally:
            edit_server.resume()
        assert all(r.ok for r in collect(client, 2).values())
        assert client.can_submit()


def test_stream_client_started_before_the_server(edit_server_factory) -> None:
    port = free_port()
    with StreamClient(f"127.0.0.1:{port}") as client:
        assert not client.connected and client.poll() == []
        edit_server_factory(port=port)
        wait_until(lambda: client.connected, "the client connected to the late server")
        render = random_image(5)
        request_id = client.submit(4, render, render, EditParams("turn it green"))
        result = collect(client, 1)[request_id]
        assert result.ok and result.view_id == 4
        np.testing.assert_allclose(result.image, expected_look("green", render), atol=1e-6)


def test_server_killed_mid_flight_then_restarted(edit_server_factory) -> None:
    server = edit_server_factory()
    port = server.port
    with StreamClient(server.address, max_in_flight=3) as client:
        wait_until(lambda: client.connected, "the client connected")
        image = random_image(7)
        server.pause()  # requests stay in flight: the server cannot answer
        ids: list[str] = [client.submit(v, image, image, EditParams("make it sepia")) for v in range(3)]
        server.kill()
        results = collect(client, 3)
        assert sorted(results) == sorted(ids)
        for result in results.values():
            assert result.error_code == grpc.StatusCode.UNAVAILABLE and result.image is None
            assert "resubmit" in result.error_message
        assert sorted(r.view_id for r in results.values()) == [0, 1, 2]
        assert (client.in_flight, client.failed, client.completed) == (0, 3, 0)

        edit_server_factory(port=port)  # same port: the client finds it again
        wait_until(client.can_submit, "the client reconnected to the restarted server")
        request_id = client.submit(0, image, image, EditParams("make it sepia"))
        result = collect(client, 1)[request_id]
        assert result.ok
        np.testing.assert_allclose(result.image, expected_look("sepia", image), atol=1e-6)


def test_close_is_prompt_and_idempotent(edit_server_address: str) -> None:
    client = StreamClient(edit_server_address).start()
    wait_until(lambda: client.connected, "the client connected")
    client.close()
    client.close()
    assert not client.connected
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(0, random_image(0), random_image(0), EditParams("make it sepia"))

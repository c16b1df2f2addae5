"""Load: 16 concurrent clients against one real server process with a bounded queue.

The server runs the `identity` backend with `--delay-ms` (every edit costs a fixed sleep) and a small
`--max-queued`, so 16 clients offer far more than it can take. Each client has its own connection and
sends its requests one after another, with a random think time between them. Asserted:
- every request is either accepted and answered with the right image (identity: its own render, bit
  for bit, with its request_id and view_id), or refused with RESOURCE_EXHAUSTED naming the full queue;
  no other outcome, no hang (deadlines);
- refusals come at once: the typical refused request sees no edit finish while it waits for its answer
  (an ordering, not a time: a refusal that waited for a queue slot would see at least one);
- the server's memory is bounded (RSS after the load within 50 MiB of RSS after a warm-up burst), it
  logs no error, and it serves a request normally afterwards.
No times are asserted; the latencies (p50, p99) are measured by bench/load.py (BENCHMARKS.md).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from conftest import REPO_ROOT, EditServerProcess, start_edit_server, subprocess_env

from diffusion_server.backends.identity import IdentityBackend
from in2n_contract import EditParams, codec
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
from testing_support import rss_bytes

CLIENTS = 16
MAX_QUEUED = 4
DELAY_MS = 200  # fixed cost of one edit
ATTEMPTS_PER_CLIENT = 6
CALL_TIMEOUT_S = 60.0
RSS_GROWTH_LIMIT = 50 << 20


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditServerProcess]:
    server = start_edit_server(
        tmp_path_factory.mktemp("load_server"), backend="identity",
        extra_args=["--delay-ms", str(DELAY_MS), "--max-queued", str(MAX_QUEUED)],
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Outcomes:
    """What the clients saw, filled by all client threads under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: int = 0
    refused: int = 0
    finished_edits: int = 0  # accepted answers received so far: the clock of `edits_seen_while_refused`
    edits_seen_while_refused: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def client(index: int, address: str, attempts: int, start: threading.Barrier, out: Outcomes) -> None:
    rng = random.Random(index)
    # A connection of its own (no subchannel shared with the other clients' channels).
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        start.wait(timeout=60)
        for attempt in range(attempts):
            render = np.random.default_rng(1000 * index + attempt).integers(0, 256, (16, 12, 3), dtype=np.uint8)
            request = pb.EditRequest(
                request_id=f"c{index}-{attempt}", view_id=1000 * index + attempt, render=codec.encode_image(render),
                original=codec.encode_image(render[::-1].copy()), instruction="anything",
            )  # fmt: skip
            with out.lock:
                finished_before = out.finished_edits
            try:
                response = stub.Edit(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                with out.lock:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in (e.details() or ""):
                        out.refused += 1
                        out.edits_seen_while_refused.append(out.finished_edits - finished_before)
                    else:
                        out.failures.append(f"{request.request_id}: {e.code().name} {e.details()!r}")
            else:
                correct = (  # identity, uint8 in: its own render back, bit for bit
                    response.edited.dtype == pb.DTYPE_UINT8
                    and (response.request_id, response.view_id) == (request.request_id, request.view_id)
                    and response.edited.data == render.tobytes()
                    and (response.edited.height, response.edited.width, response.edited.channels) == render.shape
                )
                with out.lock:
                    out.finished_edits += 1
                    out.accepted += 1
                    if not correct:
                        out.failures.append(f"{request.request_id}: wrong result")
            time.sleep(rng.uniform(0.0, DELAY_MS / 1e3))  # think time


def run_clients(address: str, attempts: int) -> Outcomes:
    out = Outcomes()
    start = threading.Barrier(CLIENTS)
    threads = [
        threading.Thread(target=client, args=(i, address, attempts, start, out), daemon=True) for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a client hung"
    return out


def test_16_clients_bounded_queue(load_server: EditServerProcess) -> None:
    warm = run_clients(load_server.address, attempts=2)  # warm-up burst: threads, connections, allocator
    assert not warm.failures, warm.failures[:5]
    rss_before = rss_bytes(load_server.proc.pid)

    out = run_clients(load_server.address, attempts=ATTEMPTS_PER_CLIENT)
    rss_after = rss_bytes(load_server.proc.pid)
    print(f"{CLIENTS} clients x {ATTEMPTS_PER_CLIENT}: accepted {out.accepted}, refused {out.refused} "
          f"({sum(1 for n in out.edits_seen_while_refused if n)} saw an edit finish while waiting); "
          f"server RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")  # fmt: skip

    assert not out.failures, out.failures[:10]
    assert out.accepted + out.refused == CLIENTS * ATTEMPTS_PER_CLIENT
    assert out.accepted >= MAX_QUEUED  # the first wave fills the queue
    assert out.refused >= CLIENTS - MAX_QUEUED  # 16 clients cannot all fit in a queue of 4
    assert statistics.median(out.edits_seen_while_refused) == 0, "refusals waited for queue slots"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"server RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"

    assert load_server.proc is not None and load_server.proc.poll() is None
    log = load_server.output()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    with grpc.insecure_channel(load_server.address) as channel:  # the queue drained: a lone request is accepted
        render = np.full((4, 4, 3), 7, np.uint8)
        request = pb.EditRequest(
            request_id="after", render=codec.encode_image(render), original=codec.encode_image(render), instruction="x"
        )
        assert pb_grpc.EditServiceStub(channel).Edit(request, timeout=CALL_TIMEOUT_S).edited.data == render.tobytes()


def test_identity_delay_is_a_fixed_cost_per_edit() -> None:
    backend = IdentityBackend(delay_s=0.05)
    image = np.zeros((2, 2, 3), np.float32)
    start = time.perf_counter()
    assert backend.edit(image, image, EditParams("x")).image is image
    assert time.perf_counter() - start >= 0.05


@pytest.mark.parametrize(
    "args,words",
    [
        (["--backend", "palette", "--delay-ms", "10"], ["--delay-ms", "identity"]),
        (["--backend", "identity", "--delay-ms", "-1"], ["--delay-ms", "[0, 600000]"]),
    ],
    ids=["not-identity", "negative"],
)
def test_delay_ms_errors_are_one_line(args: list[str], words: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "diffusion_server", "--device", "cpu", "--port", "0", *args],
                          env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), proc.stderr

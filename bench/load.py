"""Load: many concurrent clients against one server with a bounded queue and a fixed cost per edit.

    python bench/load.py [--clients 16] [--max-queued 4] [--delay-ms 100] [--attempts 40] [--side 64]

Starts `python -m diffusion_server --backend identity --delay-ms D --max-queued Q` (every edit sleeps
D ms, one edit at a time: at most 1000/D edits/s; at most Q edits queued or running) and runs C client
processes, each with its own connection, each sending `--attempts` unary `Edit` requests one after
another with a random think time in [0, D] ms between them (no retries: a refusal counts as one attempt).
Reports, for accepted requests, the round trip seen by the client and the server's own queue time
(p50 / p90 / p99 / max; every accepted answer is checked: identity returns the render bit for bit), for
refused ones (RESOURCE_EXHAUSTED) the round trip, the accepted throughput, and the server's memory
(RSS after a warm-up burst, after the run, and the peak sampled every 20 ms). Not a test: numbers
depend on the machine and its load (tests/test_load.py asserts the behaviour, no times).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import threading
import time

from _server import BenchServer, machine, percentile

from testing_support import rss_bytes

Record = tuple[str, float, float]
"""(outcome "ok" / "refused" / "wrong" / other code name, client round trip ms, server queue ms)."""


def client(index: int, address: str, attempts: int, side: int, think_ms: float, start, results) -> None:  # type: ignore[no-untyped-def]
    import grpc
    import numpy as np

    from in2n_contract import codec
    from protos.in2n.v1 import edit_service_pb2 as pb
    from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

    rng = random.Random(index)
    records: list[Record] = []
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        images = [
            np.random.default_rng(1000 * index + i).integers(0, 256, (side, side, 3), dtype=np.uint8)
            for i in range(attempts)
        ]
        start.wait()
        for i, render in enumerate(images):
            request = pb.EditRequest(request_id=f"c{index}-{i}", view_id=i, render=codec.encode_image(render),
                                     original=codec.encode_image(render), instruction="anything")  # fmt: skip
            t0 = time.perf_counter()
            try:
                response = stub.Edit(request, timeout=120)
                ms = (time.perf_counter() - t0) * 1e3
                ok = response.request_id == request.request_id and response.edited.data == render.tobytes()
                records.append(("ok" if ok else "wrong", ms, response.timings.queue_ms))
            except grpc.RpcError as e:
                ms = (time.perf_counter() - t0) * 1e3
                records.append(
                    ("refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else e.code().name, ms, 0.0)
                )
            time.sleep(rng.uniform(0.0, think_ms / 1e3))
    results.put(records)


def run(address: str, clients: int, attempts: int, side: int, think_ms: float) -> tuple[list[Record], float]:
    ctx = mp.get_context("spawn")  # no gRPC state inherited by the clients
    start, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(i, address, attempts, side, think_ms, start, results)) for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    start.wait()
    t0 = time.perf_counter()
    records: list[Record] = []
    for _ in procs:
        records.extend(results.get(timeout=600))
    wall = time.perf_counter() - t0
    for proc in procs:
        proc.join(60)
    return records, wall


def line(name: str, ms: list[float]) -> str:
    if not ms:
        return f"{name:<36} (none)"
    return (f"{name:<36} p50 {percentile(ms, 50):8.1f} ms  p90 {percentile(ms, 90):8.1f} ms  "
            f"p99 {percentile(ms, 99):8.1f} ms  max {max(ms):8.1f} ms  (n={len(ms)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-queued", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--attempts", type=int, default=40, help="requests per client")
    parser.add_argument("--side", type=int, default=64, help="images are side x side x 3 uint8")
    parser.add_argument(
        "--think-ms", type=float, default=None, help="most think time between a client's requests (default: --delay-ms)"
    )
    args = parser.parse_args()
    think_ms = args.delay_ms if args.think_ms is None else args.think_ms
    print(f"machine: {machine()}")
    print(f"server: identity --delay-ms {args.delay_ms:g} --max-queued {args.max_queued}; {args.clients} client processes x "
          f"{args.attempts} requests, {args.side}x{args.side}x3 uint8, think time U[0, {think_ms:g}] ms")  # fmt: skip
    with BenchServer("identity", ["--delay-ms", str(args.delay_ms), "--max-queued", str(args.max_queued)]) as server:
        pid = server.proc.pid
        run(server.address, args.clients, 3, args.side, think_ms)  # warm-up burst
        rss_before = rss_bytes(pid)
        peak = [rss_before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], rss_bytes(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        records, wall = run(server.address, args.clients, args.attempts, args.side, think_ms)
        stop.set()
        sampler.join()
        rss_after = rss_bytes(pid)

    accepted = [r for r in records if r[0] == "ok"]
    refused = [r for r in records if r[0] == "refused"]
    other = [r for r in records if r[0] not in ("ok", "refused")]
    print(f"requests {len(records)}: accepted with the right image {len(accepted)}, refused (RESOURCE_EXHAUSTED) {len(refused)}, "
          f"other {len(other)}{' ' + str(sorted({r[0] for r in other})) if other else ''} (\"wrong\": accepted, wrong image)")  # fmt: skip
    print(line("accepted: client round trip", [r[1] for r in accepted]))
    print(line("accepted: of which queued in server", [r[2] for r in accepted]))
    print(line("refused: client round trip", [r[1] for r in refused]))
    print(
        f"accepted throughput {len(accepted) / wall:.2f} edits/s over {wall:.1f} s (ceiling 1000/delay = {1000 / args.delay_ms:.2f})"
    )
    print(f"server RSS: {rss_before / 2**20:.1f} MiB after warm-up, {rss_after / 2**20:.1f} MiB after the run, "
          f"peak {peak[0] / 2**20:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()

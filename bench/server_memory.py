"""The server's memory through max-size requests, refused and accepted: RSS against baseline + --max-buffer-mb.

    python bench/server_memory.py [--requests 30] [--concurrency 6] [--max-buffer-mb 512] [--side 2048]

Starts `python -m diffusion_server --backend identity --max-buffer-mb B` and sends, from one client:
`--requests` unary Edits of 2x(2 x side)^2 float32 images (4096x4096 at the default: over --max-image-side and
over the gRPC message limit, all refused), then `--requests` Edits of side x side float32 images (2048x2048: the
largest accepted, 96 MiB a request), `--concurrency` at a time (the budget refuses those that would not fit).
Then the same `--requests` on one StreamEdit stream (back-pressure: the server reads a request only when
the budget has room for it). The server's RSS is sampled every 20 ms (its peak), and read after each phase
once it has settled (the lowest of 8 s of samples after the last answer). Not a test: numbers depend on the machine; the
budget's refusals and back-pressure are asserted by tests/test_server_memory.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import threading
import time

import grpc
import numpy as np
from _server import BenchServer, machine

from in2n_contract import codec
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
from testing_support import rss_bytes

MiB = 1 << 20


class RssSampler:
    """The peak RSS of process `pid`, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def settled(self, seconds: float = 8.0) -> int:
        """The lowest RSS over `seconds` (what stays held, not what is being freed)."""
        low = rss_bytes(self.pid)
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(0.05)
            low = min(low, rss_bytes(self.pid))
        return low

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def request(request_id: str, image: pb.Image) -> pb.EditRequest:
    return pb.EditRequest(request_id=request_id, render=image, original=image, instruction="anything")


def send_all(stub: pb_grpc.EditServiceStub, image: pb.Image, count: int, concurrency: int, tag: str) -> dict[str, int]:
    """`count` Edits of `image`, `concurrency` at a time; outcome counts by status code name."""
    outcomes: dict[str, int] = {}

    def one(i: int) -> str:
        try:
            stub.Edit(request(f"{tag}{i}", image), timeout=300)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(one, range(count)):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def send_stream(stub: pb_grpc.EditServiceStub, image: pb.Image, count: int) -> dict[str, int]:
    """`count` requests of `image` on one StreamEdit stream, sent as fast as the server reads them."""
    outcomes: dict[str, int] = {}
    requests = (pb.StreamEditRequest(edit=request(f"s{i}", image)) for i in range(count))
    for response in stub.StreamEdit(requests, timeout=600):
        outcome = "OK" if response.WhichOneof("outcome") == "edited" else grpc.StatusCode.INTERNAL.name
        if response.WhichOneof("outcome") == "error":
            outcome = next(c.name for c in grpc.StatusCode if c.value[0] == response.error.code)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-buffer-mb", type=int, default=512)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--extra", nargs="*", default=[], help="more server options")
    args = parser.parse_args()

    extra = ["--max-buffer-mb", str(args.max_buffer_mb), "--max-image-side", str(args.side), *args.extra]
    big = codec.encode_image(np.full((2 * args.side, 2 * args.side, 3), 0.5, np.float32))
    largest = codec.encode_image(np.full((args.side, args.side, 3), 0.25, np.float32))
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with BenchServer("identity", extra) as server:
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid)
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = pb_grpc.EditServiceStub(channel)
            small = codec.encode_image(np.zeros((8, 8, 3), np.float32))
            stub.Edit(request("warm", small), timeout=60)
            baseline = sampler.settled()
            sampler.peak = baseline
            refused = send_all(stub, big, args.requests, args.concurrency, "big")
            after_refused, peak_refused = sampler.settled(), sampler.peak
            sampler.peak = after_refused
            accepted = send_all(stub, largest, args.requests, args.concurrency, "max")
            after_accepted, peak_accepted = sampler.settled(), sampler.peak
            sampler.peak = after_accepted
            streamed = send_stream(stub, largest, args.requests)
            after_streamed, peak_streamed = sampler.settled(), sampler.peak
        sampler.close()
    budget = args.max_buffer_mb * MiB
    result = {
        "machine": machine(),
        "command": "python bench/server_memory.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "extra"),
        "budget_mib": args.max_buffer_mb,
        "baseline_mib": round(baseline / MiB),
        "refused_phase": {
            "request": f"{2 * args.side}x{2 * args.side} float32 x2",
            "outcomes": refused,
            "peak_mib": round(peak_refused / MiB),
            "after_mib": round(after_refused / MiB),
        },
        "accepted_phase": {
            "request": f"{args.side}x{args.side} float32 x2",
            "outcomes": accepted,
            "peak_mib": round(peak_accepted / MiB),
            "after_mib": round(after_accepted / MiB),
        },
        "stream_phase": {
            "request": f"{args.side}x{args.side} float32 x2, {args.requests} on one stream",
            "outcomes": streamed,
            "peak_mib": round(peak_streamed / MiB),
            "after_mib": round(after_streamed / MiB),
        },
        "peak_under_baseline_plus_budget": {
            "refused": peak_refused <= baseline + budget,
            "unary": peak_accepted <= baseline + budget,
            "stream": peak_streamed <= baseline + budget,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

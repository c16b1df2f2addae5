"""Per-request overhead of the server: the `identity` backend (no compute) at 512x512 over loopback.

    python bench/overhead.py [--requests 500] [--side 512] [--dtype uint8]

Measures, one request at a time (no overlap), the round trip seen by the client:
- unary `Edit` with render + original (`EditClient.edit`: encode, send, validate, queue, answer, decode);
- `StreamClient` in steady state (the original cached on the server, only the render travels),
  from `submit` to the result showing up in `poll` (polled every 0.1 ms).
Prints p50 / p90 / p99 in milliseconds, and the part the server itself reports (arrival to
response ready: validation, decode, queue, worker, encode). bench/grpc_floor.py gives the floor:
plain gRPC moving the same bytes. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _server import BenchServer, machine, percentile

from in2n_client import EditClient, StreamClient, original_key
from in2n_contract import EditParams


def summary(name: str, ms: list) -> str:
    return f"{name:<34} p50 {percentile(ms, 50):7.2f} ms   p90 {percentile(ms, 90):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.side, args.side, 3)
    if args.dtype == "uint8":
        render, original = (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
    else:
        render, original = (rng.random(shape, dtype=np.float32) for _ in range(2))
    params = EditParams("anything", seed=0)
    print(f"machine: {machine()}")
    print(f"images: {args.side}x{args.side}x3 {args.dtype}; backend: identity; loopback 127.0.0.1")
    with BenchServer("identity") as server:
        with EditClient(server.address, timeout_s=30) as client:
            client.wait_ready(30)
            unary, unary_server = [], []
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                reply = client.edit(render, original, params, view_id=0)
                if i >= args.warmup:
                    unary.append((time.perf_counter() - t0) * 1e3)
                    unary_server.append(reply.timings["total_ms"])
        print(summary("unary Edit (render + original)", unary))
        print(summary("  of which in the server handler", unary_server))
        with StreamClient(server.address, max_in_flight=1) as stream:
            deadline = time.monotonic() + 30
            while not stream.can_submit():
                if time.monotonic() > deadline:
                    raise RuntimeError("stream did not connect")
                time.sleep(0.01)
            steady, steady_server = [], []
            key = original_key(original)  # once per view, as the trainer does
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                stream.submit(0, render, original, params, key=key)
                results = []
                while not results:  # poll as a training loop would, without hogging the GIL
                    results = stream.poll()
                    if not results:
                        time.sleep(0.0001)
                if not results[0].ok:
                    raise RuntimeError(results[0].error_message)
                if i >= args.warmup:
                    steady.append((time.perf_counter() - t0) * 1e3)
                    steady_server.append(results[0].timings["total_ms"])
            print(summary("stream steady state (render only)", steady))
            print(summary("  of which in the server", steady_server))
            print(f"stream: originals sent {stream.originals_sent}, cache misses {stream.cache_misses}")


if __name__ == "__main__":
    main()

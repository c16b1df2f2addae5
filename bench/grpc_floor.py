"""The floor under bench/overhead.py: plain gRPC (Python, same grpcio) echoing raw bytes between two
processes on loopback, with the byte counts of a 512x512 uint8 edit and nothing else (no protobuf
messages, no validation, no worker thread).

    python bench/grpc_floor.py [--requests 500] [--side 512]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import machine, percentile

OPTIONS = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]


def serve(reply_bytes: int) -> None:
    handler = grpc.method_handlers_generic_handler(
        "floor", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request[:reply_bytes])}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    image = args.side * args.side * 3
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(image)],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        print(f"machine: {machine()}")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            echo = channel.unary_unary("/floor/Echo")
            for label, up in (
                ("2 images up, 1 down (unary edit)", 2 * image),
                ("1 image up, 1 down (steady stream)", image),
            ):
                payload = os.urandom(up)
                ms = []
                for i in range(args.warmup + args.requests):
                    t0 = time.perf_counter()
                    echo(payload, timeout=30)
                    if i >= args.warmup:
                        ms.append((time.perf_counter() - t0) * 1e3)
                print(
                    f"{label:<36} p50 {percentile(ms, 50):6.2f} ms   p99 {percentile(ms, 99):6.2f} ms   (n={len(ms)})"
                )
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()

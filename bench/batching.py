"""Edits per second against --max-batch, through the server (default: tiny-ip2p on the CPU).

    python bench/batching.py [--batches 1 2 4 8] [--edits 16] [--side 64] [--steps 10] [--threads 1]
    python bench/batching.py --backend ip2p --device cuda:0 --side 512 --steps 20 --batches 1 2 4 8

For each batch size B: a server `--backend tiny-ip2p --max-batch B --max-delay-ms 200` with
OMP_NUM_THREADS=--threads, and a StreamClient keeping 2B edits in flight (distinct seeds and
views, one instruction); after one warm-up batch, `--edits` edits are timed from first submit to
last result. Prints edits/s and the mean batch the server ran (from its Prometheus metrics).
tiny-ip2p is a tiny random model: this measures the batching machinery and the CPU's appetite
for bigger tensors, not InstructPix2Pix itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: testing_support

from _server import BenchServer, machine

from in2n_client import StreamClient
from in2n_contract import EditParams
from testing_support import free_port


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    }


def run(client: StreamClient, count: int, side: int, steps: int, first_seed: int) -> float:
    rng = np.random.default_rng(first_seed)
    submitted = done = 0
    start = time.perf_counter()
    while done < count:
        while submitted < count and client.can_submit():
            image = rng.random((side, side, 3), dtype=np.float32)
            client.submit(
                submitted,
                image,
                image,
                EditParams("turn it into bronze", diffusion_steps=steps, seed=first_seed + submitted),
            )
            submitted += 1
        for result in client.poll():
            assert result.ok, result.error_message
            done += 1
        time.sleep(0.002)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--edits", type=int, default=16)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="tiny-ip2p", help="tiny-ip2p, ip2p or ip2p-xl")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--model", default="", help="--model of the server (ip2p, ip2p-xl)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"machine: {machine()}")
    print(
        f"{args.backend} on {args.device}, {args.threads} torch thread(s), {args.side}x{args.side}, {args.steps} steps, {args.edits} edits per point"
    )
    print(f"{'max-batch':>9} {'edits/s':>8} {'s/edit':>7} {'mean batch':>10}")
    for batch in args.batches:
        metrics_port = free_port()
        extra = [
            "--max-batch",
            str(batch),
            "--max-delay-ms",
            "200",
            "--metrics-port",
            str(metrics_port),
            "--max-queued",
            "64",
        ]
        if args.model:
            extra += ["--model", args.model]
        with BenchServer(args.backend, extra, device=args.device) as server:
            with StreamClient(server.address, max_in_flight=2 * batch) as client:
                deadline = time.monotonic() + 60
                while not client.can_submit():
                    assert time.monotonic() < deadline, "no connection"
                    time.sleep(0.01)
                run(client, batch, args.side, args.steps, 10_000)  # warm-up
                before = scrape(metrics_port)
                seconds = run(client, args.edits, args.side, args.steps, 0)
                after = scrape(metrics_port)
            batches = after["in2n_batch_size_count"] - before["in2n_batch_size_count"]
            edits = after["in2n_batch_size_sum"] - before["in2n_batch_size_sum"]
            print(
                f"{batch:>9} {args.edits / seconds:>8.2f} {seconds / args.edits:>7.3f} {edits / max(batches, 1):>10.2f}"
            )


if __name__ == "__main__":
    main()

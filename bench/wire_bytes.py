"""Bytes on the wire per edit, counted by a TCP relay between a StreamClient and the server.

    python bench/wire_bytes.py [--side 512] [--views 4] [--rounds 10]

The client edits `views` views `rounds` times each (the trainer's steady state: the same views
again and again), through a relay on 127.0.0.1 that counts the bytes of each direction, TLS-free
plaintext gRPC (HTTP/2 framing included). Prints bytes per edit, client -> server and back, for the
first round (originals sent) and the following ones (originals cached), as a ratio of one raw image
(side x side x 3 bytes, uint8). Backend: identity (the bytes do not depend on it).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import numpy as np
from _server import BenchServer, machine

from in2n_client import StreamClient
from in2n_contract import EditParams


class CountingRelay:
    """127.0.0.1:port -> target, counting bytes each way."""

    def __init__(self, target_port: int):
        self.up = 0  # client -> server
        self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._target = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
            dst.sendall(data)

    def counts(self) -> tuple:
        with self._lock:
            return self.up, self.down


def run_round(client: StreamClient, renders: list[np.ndarray], originals: list[np.ndarray], params: EditParams) -> None:
    for view, (render, original) in enumerate(zip(renders, originals)):
        client.submit(view, render, original, params)
        results: list = []
        while not results:
            results = client.poll()
            time.sleep(0.0005)
        assert results[0].ok, results[0].error_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.side, args.side, 3)
    raw = args.side * args.side * 3
    renders = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(args.views)]
    originals = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(args.views)]
    params = EditParams("turn it into a bronze sculpture", seed=1)
    print(f"machine: {machine()}")
    print(
        f"images {args.side}x{args.side}x3 uint8 (raw image = {raw} bytes); {args.views} views x {args.rounds} rounds"
    )
    with BenchServer("identity") as server:
        relay = CountingRelay(int(server.address.rsplit(":", 1)[1]))
        for once in (True, False):
            with StreamClient(f"127.0.0.1:{relay.port}", max_in_flight=1, send_originals_once=once) as client:
                deadline = time.monotonic() + 30
                while not client.can_submit():
                    assert time.monotonic() < deadline, "no connection"
                    time.sleep(0.01)
                up0, down0 = relay.counts()
                run_round(client, renders, originals, params)
                up1, down1 = relay.counts()
                for _ in range(args.rounds - 1):
                    run_round(client, renders, originals, params)
                up2, down2 = relay.counts()
                steady = args.views * (args.rounds - 1)
                label = "originals sent once" if once else "original in every request"
                print(f"{label}:")
                print(
                    f"  first round  per edit: up {(up1 - up0) / args.views:10.0f} B ({(up1 - up0) / args.views / raw:.4f}x)   "
                    f"down {(down1 - down0) / args.views:10.0f} B ({(down1 - down0) / args.views / raw:.4f}x)"
                )
                print(
                    f"  steady state per edit: up {(up2 - up1) / steady:10.0f} B ({(up2 - up1) / steady / raw:.4f}x)   "
                    f"down {(down2 - down1) / steady:10.0f} B ({(down2 - down1) / steady / raw:.4f}x)"
                )


if __name__ == "__main__":
    main()

"""The trainer under server faults, on real processes: late server, dead server, restarted server.

One training run, watched through its log lines ("in2n: edits applied N, ..."
every 10 steps), is the synchronisation: each fault is injected when the log
shows the state it needs, never after a sleep.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from conftest import NS_TRAIN, QUIET, EditServerProcess

APPLIED = re.compile(r"in2n: edits applied (\d+)")


class LogWatcher:
    """Reads a process's combined output on a thread; `wait_for` blocks until a line matches (with a deadline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def wait_for(self, predicate, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == "":
                raise AssertionError("training ended before the expected log line:\n" + "".join(self.seen[-40:]))
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError("expected log line not seen in time:\n" + "".join(self.seen[-40:]))


def applied_in(line: str) -> int:
    match = APPLIED.search(line)
    return int(match.group(1)) if match else -1


def test_training_survives_a_late_server_a_dead_server_and_a_restart(pretrained, trainer_env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "faults", "--max-num-iterations", "500", "--pipeline.edit-server", f"127.0.0.1:{port}",
           "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.edit-rate", "1",
           "--pipeline.instruction", "make it grayscale", "--pipeline.log-every", "10", *QUIET]  # fmt: skip
    env = dict(trainer_env, COLUMNS="200")
    trainer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = LogWatcher(trainer)
    server = EditServerProcess(tmp_path / "server", backend="palette", port=port)
    try:
        # 1. No server at start: training runs, nothing is edited.
        log.wait_for(lambda line: applied_in(line) == 0)
        log.wait_for(lambda line: applied_in(line) == 0)
        # 2. The server comes: edits start.
        server.start()
        line = log.wait_for(lambda line: applied_in(line) >= 3)
        # 3. The server dies (SIGKILL): training goes on without it.
        server.kill()
        at_kill = applied_in(line)
        log.wait_for(lambda line: applied_in(line) >= 0)
        line = log.wait_for(lambda line: applied_in(line) >= 0)
        during_outage = applied_in(line)
        # 4. It is restarted on the same port: the trainer reconnects and edits resume.
        server = EditServerProcess(tmp_path / "server2", backend="palette", port=port).start()
        log.wait_for(lambda line: applied_in(line) > during_outage)
        assert trainer.wait(timeout=600) == 0, "".join(log.seen[-40:])
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.stop()
    assert during_outage <= at_kill + 2  # at most the edits that were already in the client's hands
    report = out / "tiny" / "in2n-tiny" / "faults" / "edit_report"
    stats = json.loads((report / "edit_stats.json").read_text())
    assert stats["edits_applied"] > during_outage
    snapshot = np.load(report / "training_images.npz")
    assert (snapshot["edits_per_view"] >= 1).all(), "every view edited despite the outage"
    images = snapshot["images"]
    assert (images[..., 0] == images[..., 1]).all(), "no corrupted or half-written image"

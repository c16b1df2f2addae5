"""The trainer under server faults, on real processes: late server, dead server, restarted server.

One training run, watched through its log lines ("in2n: edits applied N, ..."
every 10 steps), is the synchronisation: each fault is injected when the log
shows the state it needs, never after a sleep. A killed server is named down there.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time

import numpy as np
from conftest import NS_TRAIN, QUIET, EditServerProcess

from testing_support import dead_address, free_port

APPLIED = re.compile(r"in2n: edits applied (\d+)")


class LogWatcher:
    """Reads a process's combined output on a thread; `wait_for` blocks until a line matches (with a deadline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
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


def test_training_survives_a_late_server_and_three_server_crashes(pretrained, trainer_env, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(out), "--experiment-name", "tiny",
           "--timestamp", "faults", "--max-num-iterations", "800", "--pipeline.edit-server", f"127.0.0.1:{port}",
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
        # 3. Three times: the server dies (SIGKILL), training goes on without it; it is restarted on the same
        #    port, the trainer reconnects and edits resume.
        outages = []
        for k in range(3):
            at_kill = applied_in(line)
            server.kill()
            log.wait_for(lambda line: applied_in(line) >= 0 and f"127.0.0.1:{port} (cpu) " in line and "down" in line)
            line = log.wait_for(lambda line: applied_in(line) >= 0)  # a whole logging period without a server
            outages.append((at_kill, applied_in(line)))
            server = EditServerProcess(tmp_path / f"server{k + 2}", backend="palette", port=port).start()
            line = log.wait_for(lambda line, n=applied_in(line): applied_in(line) >= n + 2)  # noqa: B008 - n is bound when the lambda is made
        assert trainer.wait(timeout=600) == 0, "".join(log.seen[-40:])
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.stop()
    for at_kill, during_outage in outages:
        assert during_outage <= at_kill + 2  # at most the edits that were already in the client's hands
    report = out / "tiny" / "in2n-tiny" / "faults" / "edit_report"
    stats = json.loads((report / "edit_stats.json").read_text())
    assert stats["edits_applied"] > outages[-1][1]
    # The log says what happened: failed edits are reported with their cause, and counted.
    assert "UNAVAILABLE" in "".join(log.seen) or stats["edits_failed"] == 0
    snapshot = np.load(report / "training_images.npz")
    assert (snapshot["edits_per_view"] >= 1).all(), "every view edited despite the outage"
    images = snapshot["images"]
    assert (images[..., 0] == images[..., 1]).all(), "no corrupted or half-written image"


def test_a_trainer_killed_mid_run_resumes_with_its_edits_bit_identical(pretrained, trainer_env, tmp_path):
    import torch

    with EditServerProcess(tmp_path / "server", backend="palette") as server:
        out = tmp_path / "out"
        cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(out), "--experiment-name",
               "tiny", "--timestamp", "killed", "--max-num-iterations", "2000", "--steps-per-save", "20",
               "--pipeline.edit-server", server.address, "--pipeline.datamanager.train-num-rays-per-batch", "256",
               "--pipeline.edit-rate", "1", "--pipeline.instruction", "make it sepia", *QUIET]  # fmt: skip
        trainer = subprocess.Popen(cmd, env=trainer_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = out / "tiny" / "in2n-tiny" / "killed"
        try:
            # Wait (polling the file system, with a deadline) for a few saves that hold edits, then kill.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and trainer.poll() is None:
                saved = sorted((run / "in2n_edits").glob("step-*.pt"))
                if (
                    saved
                    and int(saved[-1].stem.split("-")[1]) >= int(max(pretrained.glob("*.ckpt")).stem.split("-")[1]) + 60
                ):
                    break
                time.sleep(0.05)
            assert trainer.poll() is None, "trainer ended before it could be killed"
            trainer.kill()  # SIGKILL: possibly in the middle of a save
            trainer.wait()
        finally:
            if trainer.poll() is None:
                trainer.kill()
    ckpt_step = max(int(p.stem.split("-")[1]) for p in (run / "nerfstudio_models").glob("step-*.ckpt"))
    expected_file = max(p for p in (run / "in2n_edits").glob("step-*.pt") if int(p.stem.split("-")[1]) <= ckpt_step)
    expected = torch.load(expected_file, map_location="cpu", weights_only=True)
    assert len(expected["views"]) > 0

    dead = dead_address()
    resume = subprocess.run(
        [NS_TRAIN, "in2n-tiny", "--load-dir", str(run / "nerfstudio_models"), "--output-dir", str(tmp_path / "resumed"),
         "--experiment-name", "tiny", "--timestamp", "resumed", "--max-num-iterations", "5",
         "--pipeline.edit-server", dead, "--pipeline.datamanager.train-num-rays-per-batch", "256", *QUIET],
        env=trainer_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"restored {len(expected['views'])} edited views" in resume.stdout
    resumed_file = max((tmp_path / "resumed" / "tiny" / "in2n-tiny" / "resumed" / "in2n_edits").glob("step-*.pt"))
    resumed = torch.load(resumed_file, map_location="cpu", weights_only=True)
    assert torch.equal(resumed["views"], expected["views"])
    assert torch.equal(resumed["images"], expected["images"])  # bit-identical


def test_a_hung_server_makes_edits_time_out_while_training_goes_on(pretrained, trainer_env, tmp_path):
    """The server stops answering (SIGSTOP) with edits in flight: their deadline fires, the views are re-queued,
    training never waits; when the server answers again, edits resume."""
    FAILED = re.compile(r"edits failed (\d+)")
    server = EditServerProcess(tmp_path / "server", backend="palette").start()
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(tmp_path / "out"),
           "--experiment-name", "tiny", "--timestamp", "hung", "--max-num-iterations", "400",
           "--pipeline.edit-server", server.address, "--pipeline.datamanager.train-num-rays-per-batch", "256",
           "--pipeline.edit-rate", "1", "--pipeline.instruction", "make it sepia", "--pipeline.log-every", "10",
           "--pipeline.edit-timeout-s", "1", *QUIET]  # fmt: skip
    trainer = subprocess.Popen(cmd, env=trainer_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = LogWatcher(trainer)
    try:
        log.wait_for(lambda line: applied_in(line) >= 2)
        server.pause()
        line = log.wait_for(lambda line: bool(FAILED.search(line)) and int(FAILED.search(line).group(1)) >= 1)
        stuck = applied_in(line)
        server.resume()
        log.wait_for(lambda line: applied_in(line) > stuck)
        assert trainer.wait(timeout=600) == 0, "".join(log.seen[-40:])
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.resume()
        server.stop()
    assert any("no answer within 1 s" in line for line in log.seen)

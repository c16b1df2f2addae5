"""Render workers (nerf_trainer/render_workers.py) on real processes, and the edit timeout freeing the client's slot.

One in-process pipeline (tiny scene, tiny nerfacto) with a render worker on the CPU (`render_devices="cpu"`)
and a stand-in client that answers every edit with its render: the worker's renders are the trainer's own
(also after the trainer's weights and camera corrections change), the trainer renders nothing itself; a worker
SIGKILLed mid-view and a worker that never answers (SIGSTOP) are each named once, their view re-queued and
rendered by the trainer until the worker is back. Synchronisation is on state (the worker's state, the counters),
polled with a deadline.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import make_pipeline

from in2n_client import StreamResult

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]

TIMEOUT_S = 5.0  # render_timeout_s: a 32x32 view of the tiny NeRF takes milliseconds


class EchoClient:
    """Stands in for StreamClient: takes every submission and answers it, at the next poll, with its render."""

    def __init__(self) -> None:
        self.sent = []  # (request_id, view_id, render)
        self.replies = []
        self.open = True  # False: takes nothing (the server is away)

    in_flight = 0

    def can_submit(self) -> bool:
        return self.open

    def submit(self, view_id, render, original, params, key=None) -> str:
        request_id = f"e{len(self.sent)}"
        self.sent.append((request_id, view_id, render))
        self.replies.append(StreamResult(request_id, view_id, render.astype(np.float32) / 255.0))
        return request_id

    def poll(self):
        replies, self.replies = self.replies, []
        return replies

    def close(self) -> None:
        pass


class Run:
    """The pipeline and its training step counter (nothing trains: the weights change only when a test says)."""

    def __init__(self, pipe) -> None:
        self.pipe, self.step = pipe, 0

    @property
    def client(self) -> EchoClient:
        return self.pipe.edit_servers.clients[0]

    @property
    def worker(self):
        return self.pipe.update.source.pool[0]

    def until(self, condition, what: str, timeout_s: float = 300.0) -> None:
        """Run update slices (a few ms apart, so the worker gets the CPU) until `condition()`; fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
            self.step += 1
            self.pipe.update_dataset(self.step)
            time.sleep(0.005)

    def sent_after(self, count: int) -> list:
        return self.client.sent[count:]


@pytest.fixture(scope="module")
def run(tiny_scene, trainer_env):
    from nerf_trainer.servers import EditServers

    pipe = make_pipeline(tiny_scene, trainer_env, max_in_flight=2, render_devices="cpu", render_sync_steps=2,
                         render_timeout_s=TIMEOUT_S, render_max_restarts=3)  # fmt: skip
    pipe.edit_servers = EditServers.from_config(pipe.config, make_client=lambda address: EchoClient())
    run = Run(pipe)
    pipe.update_dataset(0)  # starts the update and the worker process
    yield run
    pipe.update.close()
    assert not pipe.update.source.pool[0].proc.is_alive()


def trainer_render(pipe, view: int) -> np.ndarray:
    """The trainer's own render of `view`, as sent (uint8)."""
    return pipe.update.wire(pipe.renderer.render_now(view))


def test_the_worker_renders_each_view_exactly_as_the_trainer_does(run):
    pipe = run.pipe
    run.until(lambda: pipe.edit_metrics().get("edits_applied", 0) >= 4, "4 views rendered by the worker, edited")
    assert run.worker.state in ("ready", "busy") and run.worker.views >= 4
    for _, view, render in run.client.sent[:4]:
        np.testing.assert_array_equal(render, trainer_render(pipe, view))
    metrics = pipe.edit_metrics()
    assert metrics["render_steps"] == 0 and metrics["render_share"] == 0.0  # the trainer rendered none
    assert metrics["edits_applied"] >= 4 and metrics["render_worker_views"] >= 4
    assert run.worker.peak_rss_bytes > 0 and pipe.update.workers()[0]["device"] == "cpu"


def test_the_worker_follows_the_trainers_weights_and_camera_corrections(run):
    pipe = run.pipe
    model = pipe.model
    with torch.no_grad():  # what training changes: fields, appearance embeddings, the camera corrections
        model.camera_optimizer.pose_adjustment.add_(0.05)
        for param in model.field.parameters():
            param.mul_(1.1)
    changed_at, count = run.step, len(run.client.sent)
    # The worker's copy is refreshed within render_sync_steps; renders from then on carry a later step.
    run.until(lambda: pipe.update.last_model_step > changed_at, "a render from the changed weights")
    _, view, render = run.client.sent[-1]  # the render that carried it
    assert len(run.client.sent) > count
    np.testing.assert_array_equal(render, trainer_render(pipe, view))
    metrics = pipe.edit_metrics()
    assert metrics["render_steps"] == 0 and metrics["render_sync_ms"] > 0
    assert 0 <= metrics["render_lag_median"] <= metrics["render_lag_max"]


def fault_then_recovery(run, capsys, fault, expected: str) -> None:
    """Make the worker busy with a view it cannot finish (SIGSTOP), apply `fault` to it, then check: the fault
    named once, the view re-queued and sent again, rendered by the trainer meanwhile, the worker back."""
    pipe = run.pipe
    worker = run.worker
    restarts, render_steps = worker.restarts, pipe.clock.render_steps
    run.client.open = False  # no new views: the worker finishes what it has and waits
    run.until(lambda: worker.state == "ready" and not pipe.update.source.pending_views(), "the worker idle")
    pid = worker.pid
    os.kill(pid, signal.SIGSTOP)
    run.client.open = True
    try:
        run.until(lambda: worker.state == "busy", "a view handed to the stopped worker")
        stuck_view, count = worker.view, len(run.client.sent)
        fault(pid)
        run.until(lambda: worker.restarts == restarts + 1, "the fault noticed")
    finally:
        try:  # a process killed, or stopped and then killed by the trainer, is gone; else let it go on
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    run.until(lambda: stuck_view in [v for _, v, _ in run.sent_after(count)], "the stuck view sent again")
    run.until(lambda: worker.state in ("ready", "busy") and worker.pid != pid, "the worker restarted")
    views = worker.views
    run.until(lambda: worker.views >= views + 2, "views from the restarted worker")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if f"pid {pid})" in line]
    assert len(lines) == 1 and expected in lines[0] and f"view {stuck_view} re-queued" in lines[0], out
    assert pipe.clock.render_steps > render_steps  # the trainer rendered while the worker was down
    assert pipe.update.workers()[0]["restarts"] == restarts + 1


def test_a_worker_killed_mid_view_is_named_once_and_its_view_rendered_by_the_trainer(run, capsys):
    fault_then_recovery(run, capsys, lambda pid: os.kill(pid, signal.SIGKILL), "died (exit code -9)")


def test_a_worker_that_never_answers_times_out_and_is_restarted(run, capsys):
    fault_then_recovery(run, capsys, lambda pid: None, "did not finish view")  # stays stopped: the timeout


def test_checkpoint_state_counts_views_at_the_workers_as_requeued(run):
    update = run.pipe.update
    state = update.state_dict()
    assert set(update.source.pending_views()) <= set(state["retry"])


# -- an edit past edit_timeout_s frees the client's slot ---------------------------------------------


def test_an_edit_past_its_timeout_frees_the_clients_slot_and_its_late_answer_is_dropped(tiny_scene, trainer_env):
    """One slot (max_in_flight 1), a server whose edit hangs until the test opens its gate: the timeout re-queues
    the view and the client forgets the request, so the view is sent again while the first edit still has no
    answer; the first's late answer is dropped and counted, the second is applied."""
    from testing_support import GateBackend, InProcessServer

    backend = GateBackend()
    with InProcessServer(backend) as server:
        pipe = make_pipeline(tiny_scene, trainer_env, edit_server=server.address, instruction="wait",
                             max_in_flight=1, edit_timeout_s=1.0)  # fmt: skip
        run = Run(pipe)
        try:
            pipe.update_dataset(0)  # starts the update: the stream client to the server
            run.until(lambda: pipe.schedule.stats.submitted >= 1, "a first edit sent", timeout_s=60)
            run.until(lambda: pipe.schedule.stats.submitted >= 2, "the view sent again after the timeout", 60)
            assert not backend.gate.is_set() and pipe.schedule.stats.failed >= 1  # the first still unanswered
            client = pipe.edit_servers.clients[0]
            backend.gate.set()
            run.until(lambda: client.late_dropped >= 1 and pipe.schedule.stats.applied >= 1, "the answers", 60)
            assert client.in_flight <= 1
        finally:
            pipe.update.close()


@pytest.mark.parametrize(
    "train, edit, render, devices, visible",
    [
        ("cpu", "cpu", "auto", [], None),  # one device for both: the trainer renders, as before
        ("cpu", "cpu,cpu", "workers", ["cpu", "cpu"], None),
        ("cuda:0", "cuda:1,cuda:2", "auto", ["cuda:1", "cuda:2"], "0,1,2"),
        ("cuda:2", "cuda:0,cuda:3", "auto", ["cuda:1", "cuda:2"], "2,0,3"),  # the trainer's GPU is its cuda:0
        ("cuda:1", "cuda:1", "auto", [], "1"),
        ("cuda:1", "cuda:1", "workers", ["cuda:0"], "1"),  # a worker on the trainer's own card
        ("cuda:0", "cuda:1", "trainer", [], "0"),
    ],
)
def test_make_run_puts_render_workers_on_the_edit_devices(train, edit, render, devices, visible):
    from in2n_demo.run import RunConfig, edit_command, render_plan

    config = RunConfig(train_device=train, edit_device=edit, render=render)
    got, env = render_plan(config)
    assert got == devices and env.get("CUDA_VISIBLE_DEVICES") == visible
    cmd = edit_command(config, "load", "scene", "demo", "t", "x", ["a:1"])
    assert ("--pipeline.render-devices" in cmd) == bool(devices)

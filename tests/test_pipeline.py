"""The in2n pipeline in-process: what may touch the training images, and the viewer controls.

The pipeline (real nerfstudio data manager and model, tiny scene) talks to a
scripted stand-in for the stream client (or, in sync mode, the blocking client),
passed in through its EditServers, so each test decides exactly what comes back. The real client against real servers is covered in test_trainer.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import make_pipeline

from in2n_client import StreamResult, original_key

pytestmark = pytest.mark.filterwarnings("ignore")


class ScriptedClient:
    """Stands in for StreamClient: takes every submission; poll() returns what the test queued."""

    def __init__(self) -> None:
        self.sent = []  # (request_id, view_id, render, original, params)
        self.keys = []  # the original_key passed with each submission
        self.replies = []

    in_flight = 0  # nothing at the server: an idle one, waiting for the next render

    def can_submit(self) -> bool:
        return True

    def submit(self, view_id, render, original, params, key=None) -> str:
        request_id = f"r{len(self.sent)}"
        self.sent.append((request_id, view_id, render, original, params))
        self.keys.append(key)
        return request_id

    def poll(self):
        replies, self.replies = self.replies, []
        return replies

    def close(self) -> None:
        pass


class ScriptedEditClient:
    """Stands in for the blocking EditClient of sync mode: answers every edit with the render made gray."""

    def __init__(self) -> None:
        self.views = []  # view_id of each edit asked for
        self.describes = 0  # Describe calls

    def describe(self, timeout_s=None):
        from protos.in2n.v1 import edit_service_pb2 as pb

        self.describes += 1
        return pb.DescribeResponse(backend="scripted", device="cpu", precision="n/a")

    def edit(self, render, original, params, view_id=0):
        from in2n_client import EditReply

        self.views.append(view_id)
        gray = render.astype(np.float32).mean(axis=-1, keepdims=True).repeat(3, axis=-1) / 255.0  # [H, W, 3]
        return EditReply(f"s{len(self.views)}", view_id, gray, timestep=0, timings={})

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def pipeline(tiny_scene, trainer_env):
    from nerf_trainer.servers import EditServers

    # A window wide enough that edits the tests leave unanswered never stop the next test from sending.
    pipe = make_pipeline(tiny_scene, trainer_env, max_in_flight=64)
    pipe.edit_servers = EditServers.from_config(pipe.config, make_client=lambda address: ScriptedClient())
    pipe.update_dataset(0)  # starts the update: one scripted client
    yield pipe
    pipe.edit_servers.close()


def submit_one(pipeline, step: int):
    """Run update slices until one more edit is sent; returns (request_id, view, render, original, params)."""
    client = pipeline.edit_servers.clients[0]
    count = len(client.sent)
    for k in range(10):
        pipeline.update_dataset(step + k)
        if len(client.sent) > count:
            return client.sent[-1]
    raise AssertionError("no edit sent in 10 steps")


def test_a_submission_carries_the_render_and_the_untouched_original(pipeline):
    request_id, view, render, original, params = submit_one(pipeline, 100)
    dm = pipeline.datamanager
    assert render.shape == original.shape == tuple(dm.images.shape[1:]) and render.dtype == np.uint8
    expected = (dm.original_images[view].numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(original, expected)
    assert pipeline.edit_servers.clients[0].keys[-1] == original_key(original)  # computed by the trainer, once per view
    assert params.instruction == "make it grayscale" and params.seed is not None
    pipeline.edit_servers.clients[0].replies.append(StreamResult(request_id, view, np.zeros(render.shape, np.float32)))
    pipeline.update_dataset(200)
    assert torch.count_nonzero(dm.images[view]) == 0  # swapped in


@pytest.mark.parametrize(
    "make_bad, why",
    [
        (lambda shape, view: (np.zeros((shape[0] + 1, shape[1], 3), np.float32), view), "wrong size"),
        (lambda shape, view: (np.full(shape, np.nan, np.float32), view), "NaN"),
        (lambda shape, view: (np.full(shape, 2.0, np.float32), view), "out of range"),
        (lambda shape, view: (np.zeros(shape, np.float32), view + 1), "wrong view id"),
    ],
)
def test_a_bad_edit_is_rejected_without_touching_the_dataset_and_its_view_requeued(pipeline, make_bad, why):
    dm = pipeline.datamanager
    request_id, view, render, _, _ = submit_one(pipeline, 300)
    before = dm.images.clone()
    rejected = pipeline.schedule.stats.rejected
    image, view_id = make_bad(render.shape, view)
    pipeline.edit_servers.clients[0].replies.append(StreamResult(request_id, view_id % dm.num_views, image))
    _, next_view, _, _, _ = submit_one(pipeline, 400)
    assert torch.equal(dm.images, before), why
    assert pipeline.schedule.stats.rejected == rejected + 1
    assert next_view == view  # re-queued first
    # leave nothing in flight for the next test
    pipeline.edit_servers.clients[0].replies.append(
        StreamResult(pipeline.edit_servers.clients[0].sent[-1][0], next_view, None, error_code=None)
    )
    pipeline.update_dataset(500)


def lying_edit_service(precision: str | None = "n/a"):
    """An EditService whose Edit and stream answer every request with a bad image, cycling NaN, out of range, no
    pixels; its Describe reports a tiny-ip2p on the CPU in `precision` (None: Describe is UNIMPLEMENTED)."""
    import grpc

    from protos.in2n.v1 import edit_service_pb2 as pb
    from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

    class LyingEditService(pb_grpc.EditServiceServicer):
        answered = 0
        described = 0

        def bad_answer(self, request):
            h, w = request.render.height, request.render.width
            kind = self.answered % 3
            if kind == 0:
                pixels = np.full((h, w, 3), np.nan, np.float32)
            elif kind == 1:
                pixels = np.full((h, w, 3), 2.0, np.float32)
            else:
                pixels = np.zeros((0, 0, 3), np.float32)
            image = pb.Image(height=pixels.shape[0], width=pixels.shape[1], channels=3, dtype=pb.DTYPE_FLOAT32,
                             data=pixels.tobytes())  # fmt: skip
            self.answered += 1
            return pb.EditResponse(request_id=request.request_id, view_id=request.view_id, edited=image)

        def Describe(self, request, context):
            self.described += 1
            if precision is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "no Describe here")
            return pb.DescribeResponse(backend="tiny-ip2p", device="cpu", precision=precision)

        def Edit(self, request, context):
            return self.bad_answer(request)

        def StreamEdit(self, requests, context):
            for request in requests:
                yield pb.StreamEditResponse(
                    request_id=request.edit.request_id,
                    view_id=request.edit.view_id,
                    edited=self.bad_answer(request.edit),
                )

    return LyingEditService()


@pytest.fixture
def lying_server():
    """A real gRPC server (in-process, 127.0.0.1, ephemeral port) running `lying_edit_service(precision)`; call it
    with the precision; yields (address, service)."""
    from testing_support import serve_servicer

    servers = []

    def start(precision: str | None = "n/a"):
        service = lying_edit_service(precision)
        server, address = serve_servicer(service)
        servers.append(server)
        return address, service

    yield start
    for server in servers:
        server.stop(None)


def test_nan_out_of_range_and_empty_answers_count_as_rejected_edits(pipeline, lying_server):
    """A real StreamClient against a real (in-process) gRPC server that answers NaN, out-of-range and zero-size
    images: the client refuses them when decoding; the pipeline counts each as rejected (README's word), not
    failed, and the training images stay untouched."""
    from in2n_client import StreamClient

    address, service = lying_server()
    scripted = pipeline.edit_servers.clients
    client = StreamClient(address, max_in_flight=2).start()
    dm, stats = pipeline.datamanager, pipeline.schedule.stats
    before, rejected, failed = dm.images.clone(), stats.rejected, stats.failed
    try:
        pipeline.edit_servers.clients = [client]
        deadline, step = time.monotonic() + 120, 1000
        while stats.rejected < rejected + 3 and time.monotonic() < deadline:
            pipeline.update_dataset(step)  # a training step's slice: render, send, take in what came back
            step += 1
        failed_meanwhile = stats.failed - failed
    finally:
        client.close()
        pipeline.edit_servers.clients = scripted
        for request_id in list(pipeline.schedule.in_flight):  # leave nothing in flight for the next test
            pipeline.schedule.failed(request_id, "test over")
    assert service.answered >= 3
    assert stats.rejected >= rejected + 3 and failed_meanwhile == 0, (stats.rejected - rejected, failed_meanwhile)
    assert pipeline.edit_metrics()["edits_rejected"] == stats.rejected
    assert torch.equal(dm.images, before)


def test_sync_edits_are_swapped_in_counted_and_recorded_for_the_evolution_sheet(tiny_scene, trainer_env):
    """Sync mode applies its edits through the same function as async: the dataset, the counters (also per
    server) and the evolution sheet's recorder all see them."""
    from nerf_trainer.servers import EditServers

    pipe = make_pipeline(tiny_scene, trainer_env, edit_mode="sync", edit_count=2)
    sync = ScriptedEditClient()
    pipe.edit_servers = EditServers.from_config(pipe.config, make_sync_client=lambda address: sync)
    dm = pipe.datamanager
    for step in range(dm.num_views):  # edit_rate 1, edit_count 2: every view edited at least once
        pipe.update_dataset_sync(step)
    assert pipe.edit_servers.clients == [] and len(sync.views) == 2 * dm.num_views
    assert sync.describes == 1  # the precision check: once, at the first round
    metrics = pipe.edit_metrics()
    assert metrics["edits_applied"] == len(sync.views) and metrics["views_edited"] == dm.num_views
    assert torch.allclose(dm.images, dm.images.mean(dim=-1, keepdim=True).expand_as(dm.images))  # gray, swapped in
    for view in pipe.recorder.views:  # each tracked view's edits, as the sheet shows them (at most sheet_max_edits)
        assert len(pipe.recorder.edits[view]) == min(sync.views.count(view), pipe.config.sheet_max_edits) > 0
        assert np.array_equal(pipe.recorder.edits[view][-1], (dm.images[view].numpy() * 255 + 0.5).astype(np.uint8))
    (row,) = pipe.server_metrics()
    assert (row["address"], row["edits_sent"], row["edits_applied"]) == ("scripted:1", len(sync.views), len(sync.views))
    pipe.edit_servers.close()


def test_sync_mode_checks_the_precision_once_and_rejects_undecodable_answers(
    tiny_scene, trainer_env, lying_server, capsys
):
    """Sync mode with the real blocking EditClient against a real (in-process) gRPC server that reports fp32 and
    answers every Edit with a NaN, out-of-range or zero-size image: the fp16 variant's trainer names the server's
    precision once, in one line, at the first round (as async mode does), and counts every answer as rejected
    (not failed), the training images untouched."""
    from in2n_client import EditClient
    from nerf_trainer.servers import EditServers

    address, service = lying_server("fp32")
    pipe = make_pipeline(tiny_scene, trainer_env, edit_mode="sync", edit_server=address, server_precision_hint="fp16")
    pipe.edit_servers = EditServers.from_config(pipe.config, make_sync_client=lambda a: EditClient(a, timeout_s=60))
    dm = pipe.datamanager
    before = dm.images.clone()
    for step in range(6):  # edit_rate 1: a round each step
        pipe.update_dataset_sync(step)
    pipe.edit_servers.close()
    notes = [line for line in capsys.readouterr().out.splitlines() if "runs IP2P in" in line]
    assert len(notes) == 1 and address in notes[0] and "fp32" in notes[0] and "fp16" in notes[0], notes
    assert service.described == 1 and pipe.server_metrics()[0]["precision"] == "fp32"
    metrics = pipe.edit_metrics()
    assert service.answered == 6 and (metrics["edits_rejected"], metrics["edits_failed"], metrics["edits_applied"]) == (
        6,
        0,
        0,
    )
    assert torch.equal(dm.images, before)


def test_sync_mode_asks_a_server_without_describe_once(tiny_scene, trainer_env, lying_server, capsys):
    """A server whose Describe is UNIMPLEMENTED: nothing to check, nothing printed, not asked again each round."""
    from in2n_client import EditClient
    from nerf_trainer.servers import EditServers

    address, service = lying_server(None)
    pipe = make_pipeline(tiny_scene, trainer_env, edit_mode="sync", edit_server=address, server_precision_hint="fp16")
    pipe.edit_servers = EditServers.from_config(pipe.config, make_sync_client=lambda a: EditClient(a, timeout_s=60))
    for step in range(3):
        pipe.update_dataset_sync(step)
    pipe.edit_servers.close()
    assert service.described == 1 and service.answered == 3
    assert "runs IP2P in" not in capsys.readouterr().out


def test_viewer_controls_change_the_next_edits(pipeline):
    pipeline.viewer_instruction.value = "make it sepia"
    pipeline.viewer_guidance_scale.value = 3.0
    pipeline.viewer_instruction.cb_hook(pipeline.viewer_instruction)
    *_, params = submit_one(pipeline, 600)
    assert params.instruction == "make it sepia" and params.guidance_scale == 3.0
    pipeline.viewer_instruction.value = "   "  # ignored: an edit needs an instruction
    pipeline.viewer_instruction.cb_hook(pipeline.viewer_instruction)
    assert pipeline.config.instruction == "make it sepia"


# -- the render budget ---------------------------------------------------------------------------


def test_render_budget_pays_each_chunk_with_later_steps():
    from nerf_trainer.view_renderer import RenderBudget

    budget = RenderBudget(0.2, smoothing=0.0)  # allowance: 0.25 x a training step
    assert budget.may_render()  # nothing measured yet
    budget.observe_step(0.150, render_s=0.050)  # 100 ms of training, a 50 ms chunk: 2 allowances
    assert budget.allowance == pytest.approx(0.025)
    assert budget.balance == pytest.approx(-0.025) and not budget.may_render()
    budget.observe_step(0.100, render_s=0.0)
    assert budget.balance == pytest.approx(0.0) and not budget.may_render()
    budget.observe_step(0.100, render_s=0.0)
    assert budget.may_render()
    for _ in range(10):  # idle steps bank one allowance at most
        budget.observe_step(0.100, render_s=0.0)
    assert budget.balance == pytest.approx(0.025)
    assert (budget.steps, budget.render_steps) == (13, 1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            RenderBudget(bad)


@pytest.mark.parametrize("chunk_s", [0.002, 0.030, 0.300])
def test_render_budget_holds_its_share_whatever_a_chunk_costs(chunk_s):
    """Closed loop on a simulated device (training step 80 ms, a chunk chunk_s): the render share over
    the run is the budget's, whether a chunk is far under one step's allowance or far over it."""
    from nerf_trainer.view_renderer import RenderBudget

    budget, train_s = RenderBudget(0.05), 0.080
    render_total = step_total = 0.0
    for _ in range(2000):
        render_s = chunk_s if budget.may_render() else 0.0
        budget.observe_step(train_s + render_s, render_s)
        render_total, step_total = render_total + render_s, step_total + train_s + render_s
    share = render_total / step_total
    if chunk_s < budget.allowance:  # cheaper than an allowance: every step renders, under budget
        assert budget.render_steps == budget.steps and share < 0.05
    else:
        assert 0.045 <= share <= 0.05 + 2 * chunk_s / step_total, share  # the last chunk may still be owed
        assert 0 < budget.render_steps < budget.steps


# -- the render pace -----------------------------------------------------------------------------


def test_render_pace_doubles_while_a_server_waits_and_eases_off_when_none_does():
    from nerf_trainer.view_renderer import RenderPace

    pace = RenderPace(max_chunks=16)
    assert pace.chunks == 1
    for expected in (2, 4, 8, 16, 16):  # every view finished while a server sat idle: twice the pace, capped
        pace.view_done(server_waited=True)
        assert pace.chunks == expected
    for expected in (15, 14):  # finished while every server had work: one chunk less
        pace.view_done(server_waited=False)
        assert pace.chunks == expected
    for _ in range(20):
        pace.view_done(server_waited=False)
    assert pace.chunks == 1 and pace.peak == 16
    # The schedule's pace: a 64-chunk view started every 10 steps needs 7 chunks a step, no more.
    assert RenderPace.schedule_cap(64, edit_rate=10, edit_count=1) == 7
    assert RenderPace.schedule_cap(64, edit_rate=1, edit_count=1) == 64
    assert RenderPace.schedule_cap(64, edit_rate=1, edit_count=4) == 64  # never more than a view a step
    assert RenderPace.schedule_cap(1, edit_rate=10, edit_count=1) == 1
    with pytest.raises(ValueError, match="max_chunks"):
        RenderPace(0)


class BusyClient(ScriptedClient):
    """A ScriptedClient whose in_flight counts what it was sent and has not answered (it never answers)."""

    @property
    def in_flight(self) -> int:
        return len(self.sent)


@pytest.mark.parametrize("server_waits", [True, False])
def test_views_render_faster_while_a_server_waits_up_to_the_schedules_pace(tiny_scene, trainer_env, server_waits):
    """A real pipeline, a view of 64 chunks (32x32, 16 rays a chunk), a start allowed every 4 steps.

    A server with nothing at it (it waits for the trainer): each view is rendered at twice the pace of the
    one before, until a view takes the 4 steps the schedule spaces its starts; the view is started and its
    first chunk rendered in the same step. A server that always has work: one chunk a step.
    """
    from nerf_trainer.servers import EditServers

    pipe = make_pipeline(tiny_scene, trainer_env, render_chunk_rays=16, edit_rate=4, max_in_flight=64)
    client = ScriptedClient() if server_waits else BusyClient()
    pipe.edit_servers = EditServers.from_config(pipe.config, make_client=lambda address: client)
    sent_at = []
    for step in range(200):
        before = len(client.sent)
        pipe.update_dataset(step)
        sent_at += [step] * (len(client.sent) - before)
    assert pipe.renderer.chunks_per_view == 64
    steps_per_view = np.diff([-1] + sent_at).tolist()  # the first view starts at step 0
    if server_waits:
        assert steps_per_view[:5] == [64, 32, 16, 8, 4], steps_per_view
        assert set(steps_per_view[5:]) == {4} and pipe.pace.chunks == pipe.pace.max_chunks == 16
        assert pipe.edit_metrics()["render_chunks_per_step"] == 16
    else:
        # The first view finds the server empty (nothing sent yet): the second goes twice as fast; from then
        # on the server always has work, so the pace eases back to one chunk a step.
        assert steps_per_view == [64, 32, 64] and pipe.pace.chunks == 1
    for _, view, render, _, _ in client.sent:  # every view sent whole, and as rendered at once
        assert render.shape == (32, 32, 3)
    pipe.edit_servers.close()


def test_one_chunk_a_step_when_asked(tiny_scene, trainer_env):
    """--pipeline.render-max-chunks-per-step 1 keeps the old pace even while the server waits."""
    from nerf_trainer.servers import EditServers

    pipe = make_pipeline(tiny_scene, trainer_env, render_chunk_rays=256, render_max_chunks_per_step=1, max_in_flight=64)
    client = ScriptedClient()  # idle: the pace would grow, if allowed
    pipe.edit_servers = EditServers.from_config(pipe.config, make_client=lambda address: client)
    for step in range(12):
        pipe.update_dataset(step)
    assert len(client.sent) == 3 and pipe.pace.chunks == 1  # 4 chunks a view, one a step
    with pytest.raises(ValueError, match="render_max_chunks_per_step"):
        make_pipeline(tiny_scene, trainer_env, render_max_chunks_per_step=-1)

"""The in2n pipeline in-process: what may touch the training images, and the viewer controls.

The pipeline (real nerfstudio data manager and model, tiny scene) talks to a
scripted stand-in for the stream client, so each test decides exactly what
comes back. The real client against real servers is covered in test_trainer.py.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from diffusion_server.client import StreamResult, original_key

pytestmark = pytest.mark.filterwarnings("ignore")


class ScriptedClient:
    """Stands in for StreamClient: takes every submission; poll() returns what the test queued."""

    def __init__(self) -> None:
        self.sent = []  # (request_id, view_id, render, original, params)
        self.keys = []  # the original_key passed with each submission
        self.replies = []
        self.in_flight = 0

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


@pytest.fixture(scope="module")
def pipeline(tiny_scene, trainer_env):
    from nerf_trainer.datamanager import In2nDataManagerConfig
    from nerf_trainer.model import In2nModelConfig
    from nerf_trainer.pipeline import In2nPipelineConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    old_home = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = trainer_env["TORCH_HOME"]  # the planted AlexNet for nerfacto's LPIPS metric
    try:
        config = In2nPipelineConfig(
            datamanager=In2nDataManagerConfig(data=tiny_scene, train_num_rays_per_batch=128),
            model=In2nModelConfig(
                implementation="torch", num_nerf_samples_per_ray=8, num_proposal_samples_per_ray=(16, 8),
                num_levels=4, log2_hashmap_size=12, max_res=64, hidden_dim=16, hidden_dim_color=16,
                use_lpips=False, average_init_density=0.01,
            ),  # fmt: skip
            edit_server=dead, render_chunk_rays=0, edit_seed=0, edit_rate=1, sheet_views=2, log_every=0,
            instruction="make it grayscale",
        )
        pipe = config.setup(device="cpu", test_mode="val")
    finally:
        if old_home is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = old_home
    pipe.update_dataset(0)  # starts the update (real clients to a dead port), then swap in the scripted one
    for client in pipe.clients:
        client.close()
    pipe.clients = [ScriptedClient()]
    yield pipe
    pipe.clients = []


def submit_one(pipeline, step: int):
    """Run update slices until one more edit is sent; returns (request_id, view, render, original, params)."""
    client = pipeline.clients[0]
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
    assert pipeline.clients[0].keys[-1] == original_key(original)  # computed by the trainer, once per view
    assert params.instruction == "make it grayscale" and params.seed is not None
    pipeline.clients[0].replies.append(StreamResult(request_id, view, np.zeros(render.shape, np.float32)))
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
    pipeline.clients[0].replies.append(StreamResult(request_id, view_id % dm.num_views, image))
    _, next_view, _, _, _ = submit_one(pipeline, 400)
    assert torch.equal(dm.images, before), why
    assert pipeline.schedule.stats.rejected == rejected + 1
    assert next_view == view  # re-queued first
    # leave nothing in flight for the next test
    pipeline.clients[0].replies.append(StreamResult(pipeline.clients[0].sent[-1][0], next_view, None, error_code=None))
    pipeline.update_dataset(500)


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


def test_render_budget_chunk_from_step_and_ray_times():
    from nerf_trainer.view_renderer import RenderBudget

    budget = RenderBudget(0.05, initial_rays=4096, max_rays=64 * 64, min_rays=64)
    assert budget.chunk() == 4096  # nothing measured yet
    budget.observe_step(0.110, render_s=0.010)  # 100 ms of training
    assert budget.chunk() == 4096  # still no render time
    budget.observe_render(0.010, rays=1000)  # 10 us a ray
    assert budget.chunk() == int(0.05 / 0.95 * 0.100 / 1e-5)  # 526 rays: 5.26 ms of render against 100 ms of training
    assert RenderBudget(0.5, 100, max_rays=1024).chunk() == 100
    slow = RenderBudget(0.05, 100, max_rays=1024, min_rays=64, smoothing=0.0)
    slow.observe_step(0.1, 0.0)
    slow.observe_render(1.0, rays=10)  # 0.1 s a ray: the budget allows less than one ray
    assert slow.chunk() == 64
    slow.observe_render(1e-9, rays=1000)  # (smoothing 0: the latest measurement alone)
    assert slow.chunk() == 1024  # a whole view fits: never more than max_rays
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            RenderBudget(bad, 100, 1024)


def test_render_budget_holds_its_share_on_a_simulated_device():
    """Closed loop against a device whose training step takes 80 ms and whose render costs 1 ms per
    chunk plus 20 us a ray: the share of time spent rendering settles on the budget."""
    from nerf_trainer.view_renderer import RenderBudget

    budget = RenderBudget(0.05, initial_rays=4096, max_rays=512 * 512)
    train_s, shares = 0.080, []
    for _ in range(200):
        rays = budget.chunk()
        render_s = 0.001 + 2e-5 * rays
        budget.observe_render(render_s, rays)
        budget.observe_step(train_s + render_s, render_s)
        shares.append(render_s / (train_s + render_s))
    settled = shares[-50:]
    assert 0.048 <= min(settled) and max(settled) <= 0.0505, (min(settled), max(settled))
    assert shares[0] > 0.5  # the first chunk (4096 rays) was far over: the loop brought it down

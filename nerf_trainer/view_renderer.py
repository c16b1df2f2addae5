"""Renders one whole training view a chunk of rays at a time, between training steps.

Rendering a full view costs many training steps' worth of compute. Done at
once it would stall one step; here it is spread: each training step renders
`chunk_rays` more rays of the pending view, and the view is done after
ceil(H * W / chunk_rays) steps. Rays come from the training ray generator
with the camera optimizer's pose correction applied, exactly as the training
rays of that view are made.

`RenderPace` sets how many chunks a step renders, view by view, so that a view
is ready when a server can take one (and no sooner than the edit schedule can
use it). `RenderBudget` decides, from measured times, which steps render at
all, so that rendering takes a given share of the training time whatever the
hardware; `StepClock` measures those times (step starts, render time per step)
and the share rendering took.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from nerfstudio.models.base_model import Model


class ViewRenderer:
    """Incremental full-view renders from a model and the training cameras."""

    def __init__(self, model: Model, ray_generator, height: int, width: int, chunk_rays: int) -> None:
        if chunk_rays < 0:
            raise ValueError(f"chunk_rays must be >= 0 (0 renders a view at once), got {chunk_rays}")
        self.model = model
        self.ray_generator = ray_generator
        self.height, self.width = height, width
        self.chunk_rays = chunk_rays if chunk_rays > 0 else height * width
        self.view: int | None = None
        self._pixels: torch.Tensor | None = None  # [H*W, 2] (y, x)
        self._rgb: torch.Tensor | None = None  # [H*W, 3]
        self._done = 0

    @property
    def busy(self) -> bool:
        return self.view is not None

    def start(self, view: int) -> None:
        """Begin rendering camera `view`."""
        if self.busy:
            raise RuntimeError(f"already rendering view {self.view}")
        ys, xs = torch.meshgrid(torch.arange(self.height), torch.arange(self.width), indexing="ij")
        self._pixels = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1)
        self._rgb = torch.empty(self.height * self.width, 3)
        self._done = 0
        self.view = view

    @property
    def chunks_per_view(self) -> int:
        return math.ceil(self.height * self.width / self.chunk_rays)

    @torch.no_grad()
    def advance(self, chunks: int = 1) -> torch.Tensor | None:
        """Render the next `chunks` chunks (one model call each); returns the finished view ([H, W, 3] float32 on
        CPU) once complete."""
        assert self.view is not None and self._pixels is not None and self._rgb is not None
        for _ in range(max(1, chunks)):
            end = min(self._done + self.chunk_rays, self._pixels.shape[0])
            pixels = self._pixels[self._done : end]
            indices = torch.cat([torch.full((len(pixels), 1), self.view, dtype=torch.long), pixels], dim=-1)  # [R, 3]
            self._rgb[self._done : end] = self.render_rays(indices)
            self._done = end
            if self._done == self._pixels.shape[0]:
                break
        if self._done < self._pixels.shape[0]:
            return None
        image = self._rgb.view(self.height, self.width, 3).clamp(0.0, 1.0)
        self.view, self._pixels, self._rgb = None, None, None
        return image

    def cancel(self) -> int | None:
        """Abandon the view being rendered (if any); returns it."""
        view = self.view
        self.view, self._pixels, self._rgb = None, None, None
        return view

    def render_now(self, view: int) -> torch.Tensor:
        """Render camera `view` whole, at once: [H, W, 3] float32 on CPU (for reports, not the hot path)."""
        if self.busy:
            raise RuntimeError(f"already rendering view {self.view}")
        self.start(view)
        while True:
            image = self.advance()
            if image is not None:
                return image

    @torch.no_grad()
    def render_rays(self, indices: torch.Tensor) -> torch.Tensor:
        """RGB [R, 3] on CPU of rays given as (camera, y, x) indices [R, 3]."""
        was_training = self.model.training
        ray_bundle = self.ray_generator(indices.to(self.model.device))
        camera_optimizer = getattr(self.model, "camera_optimizer", None)
        if camera_optimizer is not None:
            camera_optimizer.apply_to_raybundle(ray_bundle)
        self.model.eval()
        try:
            outputs = self.model(ray_bundle)
        finally:
            self.model.train(was_training)
        return outputs["rgb"].float().cpu()


class RenderPace:
    """How many chunks of the view being prepared one training step renders, so that views are ready when a
    server can take one, and no sooner than needed.

    One chunk a step spreads a 512x512 view over 64 steps at 4096 rays a chunk: fewer views than the edit
    schedule (one every edit_rate steps) and the servers can use. So the pace adapts, view by view: a view
    finished while a server sat idle (nothing at it: it waited for this render) doubles the chunks per
    step; a view finished while every server still had work lowers them by one. It never exceeds
    `max_chunks`, which the pipeline sets so that a view takes at least as many steps as the schedule spaces
    its starts (edit_rate / edit_count): faster renders than that would only wait. A render budget, when set,
    still bounds the share of time all this takes (it pays for every chunk a step renders).
    """

    def __init__(self, max_chunks: int) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.max_chunks = max_chunks
        self.chunks = 1  # chunks per step now
        self.peak = 1  # most chunks per step so far

    def view_done(self, server_waited: bool) -> None:
        """A view was finished; `server_waited`: some server had nothing to do at that moment."""
        if server_waited:
            self.chunks = min(2 * self.chunks, self.max_chunks)
        else:
            self.chunks = max(1, self.chunks - 1)
        self.peak = max(self.peak, self.chunks)

    @staticmethod
    def schedule_cap(chunks_per_view: int, edit_rate: int, edit_count: int) -> int:
        """Chunks per step that render one view in the steps the schedule spaces its starts: >= 1."""
        return max(1, min(chunks_per_view, math.ceil(chunks_per_view * edit_count / max(1, edit_rate))))


class RenderBudget:
    """Which training steps render a chunk, so that rendering takes `share` of the training time.

    A token bucket of seconds: every step earns an allowance of share / (1 - share) times the
    (moving average) time of a training step without its render, and a step that renders pays
    what its chunk took. A step renders only while the balance is positive; steps without render
    bank one allowance at most, so idle steps save nothing up. Over a run, render time / (training
    + render time) = share, whatever a chunk costs on this hardware: a chunk that costs three
    allowances is followed by two steps without render. The chunk size (`render_chunk_rays`)
    stays what it is, so rendering keeps its efficiency (a fixed cost per chunk is not multiplied)
    and the slowest steps are a training step plus one chunk.
    """

    def __init__(self, share: float, smoothing: float = 0.9) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be in (0, 1), got {share}")
        self.share = share
        self.smoothing = smoothing
        self.step_s: float | None = None  # moving average of a training step without its render
        self.balance = 0.0  # seconds of render time available
        self.steps = 0  # steps observed
        self.render_steps = 0  # steps that rendered

    @property
    def allowance(self) -> float:
        """Render seconds one step earns."""
        return 0.0 if self.step_s is None else self.share / (1.0 - self.share) * self.step_s

    def may_render(self) -> bool:
        """Whether this step may render a chunk (always, until a step has been measured)."""
        return self.step_s is None or self.balance > 0.0

    def observe_step(self, step_s: float, render_s: float) -> None:
        """A whole training step took step_s seconds, render_s of them rendering (0: it did not render)."""
        if not (step_s > 0 and math.isfinite(step_s) and math.isfinite(render_s)):
            return
        train_s = max(step_s - render_s, 0.0)
        self.step_s = (
            train_s if self.step_s is None else self.smoothing * self.step_s + (1.0 - self.smoothing) * train_s
        )
        if render_s > 0:
            self.balance += self.allowance - render_s
        else:  # a step without render banks at most one allowance
            self.balance = min(self.balance + self.allowance, self.allowance)
        self.steps += 1
        self.render_steps += int(render_s > 0)


class StepClock:
    """Training-step timing: when each step started, how long it spent rendering, the render share.

    `step_started()` runs at the start of every training step; the update calls `observe_last_step()`
    once per step before it renders, and `rendered(seconds)` when it rendered a chunk. With a `budget`,
    each observed step is also fed to it, and `may_render()` asks it.
    """

    def __init__(self, budget: RenderBudget | None = None) -> None:
        self.budget = budget
        self.starts: list[float] = []  # time.perf_counter() at the start of each training step
        self.render_steps = 0  # steps that rendered a chunk of a view to edit
        self._render_s = 0.0  # time spent rendering in the current step
        self._steps_seen = 0  # step starts already accounted
        self._render_total_s = 0.0  # time spent rendering views to edit, over the accounted steps
        self._steps_total_s = 0.0  # duration of the accounted steps

    def step_started(self) -> None:
        self.starts.append(time.perf_counter())

    def observe_last_step(self) -> None:
        """Account the step that just ended: its render time against its duration (budget, render share)."""
        starts = self.starts
        if len(starts) >= 2 and len(starts) > self._steps_seen:
            step_s = starts[-1] - starts[-2]
            if self.budget is not None:
                self.budget.observe_step(step_s, self._render_s)
            self._render_total_s += self._render_s
            self._steps_total_s += step_s
        self._steps_seen = len(starts)
        self._render_s = 0.0

    def may_render(self) -> bool:
        """Whether this step may render a chunk (always without a budget)."""
        return self.budget is None or self.budget.may_render()

    def rendered(self, seconds: float) -> None:
        """This step spent `seconds` rendering a chunk."""
        self._render_s = seconds
        self.render_steps += 1

    @property
    def render_share(self) -> float:
        """Render time / step time over the accounted steps (0 before any)."""
        return round(self._render_total_s / self._steps_total_s, 4) if self._steps_total_s > 0 else 0.0

    def step_times(self) -> np.ndarray:
        """Wall time of each whole training step so far, in seconds ([S-1])."""
        return np.diff(np.asarray(self.starts, dtype=np.float64))

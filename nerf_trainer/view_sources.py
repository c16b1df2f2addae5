"""Where the views to edit are rendered: one interface, two implementations.

A `ViewSource` takes views the update asks for (`request`) and hands back finished renders
(`advance`, once per training step, never blocking), each with the model step it was rendered
from. `InStepViews` renders in the trainer's own steps, a few chunks a step (the render pace and
budget of view_renderer.py). `WorkerViews` (render_workers.py) hands views to render worker
processes beside the edit devices and renders in the trainer's steps only while a worker is down.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nerf_trainer.view_renderer import RenderPace, StepClock, ViewRenderer


@dataclass
class RenderedView:
    """A finished render of a view to edit."""

    view: int
    image: torch.Tensor
    """[H, W, 3] float32 on the CPU, in [0, 1]."""
    model_step: int
    """The trainer's step whose weights rendered it (the lag of its edit is counted from it)."""


class ViewSource(ABC):
    """Renders the views the Iterative Dataset Update asks for, without blocking a training step."""

    @abstractmethod
    def capacity(self) -> int:
        """How many more views it may be asked for now (>= 0)."""

    @abstractmethod
    def request(self, view: int, step: int) -> None:
        """Queue `view` to be rendered (asked at training step `step`)."""

    @abstractmethod
    def advance(self, step: int) -> list[RenderedView]:
        """One non-blocking slice of work at training step `step`; returns the views finished since the last call."""

    @abstractmethod
    def pending_views(self) -> list[int]:
        """Views asked for and not handed back yet."""

    @abstractmethod
    def cancel(self) -> list[int]:
        """Abandon every pending view; returns them (to be re-queued)."""

    def metrics(self) -> dict[str, float]:
        """Counters for the status line and edit_stats.json."""
        return {}

    def workers(self) -> list[dict]:
        """Per render worker: device, pid, state, views rendered, restarts, peak memory (none here)."""
        return []

    def close(self) -> None:
        """Stop whatever it started."""


class InStepViews(ViewSource):
    """Renders one view at a time in the trainer's steps: `pace.chunks` chunks a step, on the steps the clock's
    render budget allows (view_renderer.py)."""

    def __init__(
        self, renderer: ViewRenderer, pace: RenderPace, clock: StepClock, server_waited: Callable[[], bool]
    ) -> None:
        """server_waited() -> whether some server has nothing to do (the pace doubles after such a view)."""
        self.renderer, self.pace, self.clock = renderer, pace, clock
        self.server_waited = server_waited
        self._step = 0  # the training step the view in progress was started at

    def capacity(self) -> int:
        return 0 if self.renderer.busy else 1

    def request(self, view: int, step: int) -> None:
        self.renderer.start(view)
        self._step = step

    def advance(self, step: int) -> list[RenderedView]:
        if not self.renderer.busy or not self.clock.may_render():
            return []  # nothing to render, or over the render budget: this step trains only
        view = self.renderer.view
        started = time.perf_counter()
        rendered = self.renderer.advance(self.pace.chunks)
        self.clock.rendered(time.perf_counter() - started)
        if rendered is None:
            return []
        self.pace.view_done(server_waited=self.server_waited())
        # Chunks rendered over several steps: the weights are those of the latest, when the view was completed.
        return [RenderedView(view, rendered, step)]

    def pending_views(self) -> list[int]:
        return [] if self.renderer.view is None else [self.renderer.view]

    def cancel(self) -> list[int]:
        view = self.renderer.cancel()
        return [] if view is None else [view]

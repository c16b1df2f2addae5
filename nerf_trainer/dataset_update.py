"""Iterative Dataset Update, asynchronous: which view to edit next, and what to do with results.

This is the bookkeeping of the method, with no training code in it:

- the training views are ordered randomly once and edited in that order, cycling;
- at most `max_in_flight` edits are outstanding; a new view is chosen only when
  a slot is free, and at most `edit_count` views are started every `edit_rate`
  steps (upper bounds: the servers' pace decides the real rate);
- a result is checked (size, finite, range) before it may touch the dataset; a
  bad one (or one the client could not decode: `reject`) is rejected, counted
  as rejected, logged and its view re-queued first;
- a result for a view that a newer edit has already replaced is dropped;
- failed requests (server gone, error status) put their view back first in line.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Submission:
    """An edit in flight."""

    view: int
    seq: int
    """Global submission number; a larger one is a newer edit."""
    step: int
    """Training step at which it was sent."""
    sent_at: float = field(default_factory=time.monotonic)
    """time.monotonic() when it was sent."""


@dataclass
class UpdateStats:
    """Counters shown in logs and checked by tests."""

    submitted: int = 0
    applied: int = 0
    rejected: int = 0
    failed: int = 0
    stale: int = 0
    edits_per_view: dict[int, int] = field(default_factory=dict)


class DatasetUpdateSchedule:
    """Decides which view is edited next and whether a returned edit may be swapped in."""

    def __init__(
        self,
        num_views: int,
        edit_rate: int,
        edit_count: int,
        max_in_flight: int,
        seed: int | None = None,
        max_edits_per_view: int = 0,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be positive, got {num_views}")
        if edit_rate < 1 or edit_count < 1:
            raise ValueError(f"edit_rate and edit_count must be >= 1, got {edit_rate} and {edit_count}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_edits_per_view < 0:
            raise ValueError(f"max_edits_per_view must be >= 0 (0: no limit), got {max_edits_per_view}")
        self.max_edits_per_view = max_edits_per_view
        self.num_views = num_views
        self.edit_rate, self.edit_count, self.max_in_flight = edit_rate, edit_count, max_in_flight
        self.order: list[int] = np.random.default_rng(seed).permutation(num_views).tolist()
        self._cursor = 0
        self._retry: deque[int] = deque()
        self._window_start: int | None = None
        self._started_in_window = 0
        self._seq = 0
        self.in_flight: dict[str, Submission] = {}
        self._latest_applied: dict[int, int] = {}  # view -> seq of the edit now in the dataset
        self._pending_views: dict[int, int] = {}  # view -> number of its edits in flight
        self.stats = UpdateStats()

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the order, where it is, the re-queued views and per-view counts."""
        return {
            "order": list(self.order),
            "cursor": self._cursor,
            "retry": list(self._retry) + [sub.view for sub in self.in_flight.values()],
            "seq": self._seq,
            "edits_per_view": dict(self.stats.edits_per_view),
            "applied": self.stats.applied,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; edits that were in flight are re-queued first."""
        if sorted(state["order"]) != list(range(self.num_views)):
            raise ValueError(f"saved edit order is for {len(state['order'])} views, this dataset has {self.num_views}")
        self.order = list(state["order"])
        self._cursor = int(state["cursor"])
        self._retry = deque(dict.fromkeys(int(v) for v in state["retry"]))
        self._seq = int(state["seq"])
        self.stats.edits_per_view = {int(k): int(v) for k, v in state["edits_per_view"].items()}
        self.stats.applied = int(state["applied"])

    def may_start(self, step: int, reserved: int = 0) -> bool:
        """Whether a new view may be started at `step` (`reserved`: views being rendered, not yet sent)."""
        window = step // self.edit_rate
        if window != self._window_start:
            self._window_start, self._started_in_window = window, 0
        return (
            self._started_in_window < self.edit_count
            and len(self.in_flight) + reserved < self.max_in_flight
            and (bool(self._retry) or self._next_eligible() is not None)
        )

    def _eligible(self, view: int) -> bool:
        """Under max_edits_per_view, counting edits applied and in flight."""
        if self.max_edits_per_view == 0:
            return True
        done = self.stats.edits_per_view.get(view, 0) + self._pending_views.get(view, 0)
        return done < self.max_edits_per_view

    def _next_eligible(self) -> int | None:
        """Offset from the cursor of the next eligible view in the order, or None when none is left."""
        for offset in range(self.num_views):
            if self._eligible(self.order[(self._cursor + offset) % self.num_views]):
                return offset
        return None

    @property
    def finished(self) -> bool:
        """True when max_edits_per_view is reached for every view and nothing is in flight or re-queued."""
        return not self.in_flight and not self._retry and self._next_eligible() is None

    def next_view(self, step: int) -> int:
        """Take the next view to edit (re-queued views first, then the random order, cycling)."""
        self.may_start(step)
        self._started_in_window += 1
        if self._retry:
            return self._retry.popleft()
        offset = self._next_eligible()
        if offset is None:
            raise RuntimeError("every view has had max_edits_per_view edits; check may_start() first")
        view = self.order[(self._cursor + offset) % self.num_views]
        self._cursor += offset + 1
        return view

    def submitted(self, request_id: str, view: int, step: int) -> None:
        """Record that `view` was sent as `request_id`."""
        self._seq += 1
        self.in_flight[request_id] = Submission(view=view, seq=self._seq, step=step)
        self._pending_views[view] = self._pending_views.get(view, 0) + 1
        self.stats.submitted += 1

    def expired(self, sent_before: float) -> list[str]:
        """Request ids of edits in flight sent before `sent_before` (a time.monotonic() value)."""
        return [rid for rid, sub in self.in_flight.items() if sub.sent_at < sent_before]

    def requeue(self, view: int) -> None:
        """Put `view` first in line (its render could not be sent, or its edit failed)."""
        if view not in self._retry:
            self._retry.append(view)

    def _finish(self, request_id: str) -> Submission | None:
        sub = self.in_flight.pop(request_id, None)
        if sub is not None:
            self._pending_views[sub.view] -= 1
            if self._pending_views[sub.view] == 0:
                del self._pending_views[sub.view]
        return sub

    def failed(self, request_id: str, reason: str) -> None:
        """An edit came back as an error: re-queue its view."""
        sub = self._finish(request_id)
        if sub is None:
            logger.warning("error for unknown request %s ignored: %s", request_id, reason)
            return
        self.stats.failed += 1
        logger.warning("edit of view %d failed (%s); view re-queued", sub.view, reason)
        self.requeue(sub.view)

    def reject(self, request_id: str, reason: str) -> None:
        """A result came back that could not even be decoded (NaN, out of range, no pixels...): reject it."""
        sub = self._finish(request_id)
        if sub is None:
            logger.warning("bad result for unknown request %s ignored: %s", request_id, reason)
            return
        self._reject(sub, reason)

    def _reject(self, sub: Submission, problem: str) -> None:
        self.stats.rejected += 1
        logger.warning("edit of view %d rejected: %s; view re-queued", sub.view, problem)
        self.requeue(sub.view)

    def accept(
        self, request_id: str, view_id: int, image: np.ndarray | None, expected_shape: tuple[int, int, int]
    ) -> Submission | None:
        """Check a returned edit. Returns its submission when it may be swapped in, else None.

        Rejects (and re-queues the view) a result whose view id does not match what
        was sent, whose shape differs from `expected_shape`, or whose values are not
        finite or outside [0, 1]. Drops a result older than the edit already swapped in.
        """
        sub = self._finish(request_id)
        if sub is None:
            logger.warning("result for unknown request %s ignored", request_id)
            return None
        problem = None
        if view_id != sub.view:
            problem = f"it names view {view_id} but view {sub.view} was sent"
        elif image is None:
            problem = "it carries no image"
        elif tuple(image.shape) != tuple(expected_shape):
            problem = f"its shape is {tuple(image.shape)}, expected {tuple(expected_shape)}"
        elif not np.isfinite(image).all():
            problem = "it holds NaN or infinite values"
        elif image.min() < 0.0 or image.max() > 1.0:
            problem = f"its values span [{image.min():.3g}, {image.max():.3g}], outside [0, 1]"
        if problem is not None:
            self._reject(sub, problem)
            return None
        if self._latest_applied.get(sub.view, 0) > sub.seq:
            self.stats.stale += 1
            return None
        self._latest_applied[sub.view] = sub.seq
        self.stats.applied += 1
        self.stats.edits_per_view[sub.view] = self.stats.edits_per_view.get(sub.view, 0) + 1
        return sub

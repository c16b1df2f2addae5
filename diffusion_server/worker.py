"""The batching worker: the one thread that owns the backend.

`EditWorker` takes up to `max_batch` queued edits (`EditJob`s from `validation.parse_request`) at a time,
waiting at most `max_delay_s` for more to arrive, and runs them as one `edit_batch` call where the backend
supports batching, one by one otherwise (a failed batch is retried one by one, so each edit gets its own
outcome). Before computing it drops what nobody waits for any more: an edit whose deadline has passed
fails with DEADLINE_EXCEEDED, one whose client cancelled or went away is cancelled. Each result is
encoded for the wire (`encode_output`) and completes the job's future with an EditResponse (or a
`RequestError`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

import grpc
import numpy as np

from diffusion_server.backends.base import EditBackend, EditCancelled, EditItem, EditRejected, EditResult
from diffusion_server.metrics import Metrics
from diffusion_server.validation import EditJob, RequestError
from in2n_contract import codec, pb

log = logging.getLogger(__name__)


def encode_output(image: np.ndarray, shape: tuple, uint8_out: bool) -> pb.Image:
    """Backend output [H, W, 3] -> wire image; raises RequestError (INTERNAL) on a malformed output."""
    image = np.asarray(image)
    if image.shape != shape:
        raise RequestError(grpc.StatusCode.INTERNAL, f"backend returned shape {image.shape}, expected {shape}")
    if image.dtype == np.uint8:  # from a backend that accepts_uint8: already quantized
        return codec.encode_image(image) if uint8_out else codec.encode_image(codec.to_float01(image))
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise RequestError(grpc.StatusCode.INTERNAL, "backend returned NaN or infinite values")
    if uint8_out:  # round(clip(x, 0, 1) * 255), in place on one temporary (the hot path at 512x512: ~1 ms)
        scaled = np.multiply(image, np.float32(255.0), dtype=np.float32)
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        return codec.encode_image(scaled.astype(np.uint8))
    return codec.encode_image(np.clip(image, 0.0, 1.0))


def _backend_error(job: EditJob, error: BaseException) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if isinstance(error, EditRejected):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, EditCancelled):
        return RequestError(grpc.StatusCode.CANCELLED, f"edit stopped: {error}")
    log.error(
        "backend failed on request %r (view %d): %s: %s",
        job.request_id,
        job.view_id,
        type(error).__name__,
        error,
        exc_info=(type(error), error, error.__traceback__),
    )
    return RequestError(grpc.StatusCode.INTERNAL, f"backend error: {type(error).__name__}: {error}")


class EditWorker:
    """The single thread that owns the backend: takes batches of queued edits and runs them."""

    def __init__(
        self,
        backend: EditBackend,
        max_queued: int,
        max_batch: int = 1,
        max_delay_s: float = 0.0,
        metrics: Metrics | None = None,
    ):
        self._backend = backend
        self._max_queued = max_queued
        self._max_batch = max_batch if getattr(backend, "supports_batching", False) else 1
        self._max_delay_s = max_delay_s
        self._metrics = metrics if metrics is not None else Metrics()
        self._cond = threading.Condition()
        self._queue: collections.deque[EditJob] = collections.deque()
        self._pending = 0  # queued or running
        self._closed = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="edit-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def submit(self, job: EditJob) -> concurrent.futures.Future[pb.EditResponse]:
        """Queue `job`; raises RequestError: RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when stopping."""
        with self._cond:
            if self._closed or self._draining:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another server or later"
                )
            if self._pending >= self._max_queued:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server queue is full ({self._max_queued} edits queued or running); retry later",
                )
            self._pending += 1
            self._queue.append(job)
            self._update_gauges()
            self._cond.notify_all()
        job.future.add_done_callback(lambda _f, job=job: self._release(job))
        return job.future

    def _update_gauges(self) -> None:  # with self._cond held
        self._metrics.queue_changed(len(self._queue), self._pending)

    def _release(self, job: EditJob) -> None:
        """Every job's future ends exactly once (result, error or cancel): it stops counting then."""
        with self._cond:
            for i, queued in enumerate(self._queue):  # cancelled while queued: free its slot at once
                if queued is job:  # by identity (deque.remove would compare arrays and repr the job on a miss)
                    del self._queue[i]
                    break
            self._pending -= 1
            self._update_gauges()
            self._cond.notify_all()

    def _take_batch(self) -> list[EditJob] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            if self._max_batch > 1:
                until = time.perf_counter() + self._max_delay_s
                while len(batch) < self._max_batch and not self._closed:
                    if self._queue:
                        batch.append(self._queue.popleft())
                        continue
                    remaining = until - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            self._update_gauges()
        return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._run_guarded(batch)
            del batch  # not held while waiting for the next one: its images and answers are large

    def _run_guarded(self, batch: list[EditJob]) -> None:
        """`_run_batch`; a failure of the worker itself fails the batch's unanswered edits with INTERNAL."""
        try:
            self._run_batch(batch)
        except Exception:
            log.exception("edit worker failure")
            for job in batch:
                if not job.future.done():
                    try:
                        job.future.set_exception(RequestError(grpc.StatusCode.INTERNAL, "edit worker failure"))
                    except concurrent.futures.InvalidStateError:
                        pass

    def _live(self, batch: list[EditJob]) -> list[EditJob]:
        """The jobs of `batch` still worth computing, marked running; the others are answered here."""
        now = time.perf_counter()
        live = []
        for job in batch:
            if not job.is_active():
                job.future.cancel()  # the client is gone
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            if job.deadline is not None and now > job.deadline:
                waited = (now - job.arrival) * 1e3
                job.future.set_exception(
                    RequestError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"deadline passed after {waited:.0f} ms in the queue; not computed",
                    )
                )
                continue
            live.append(job)
        return live

    def _run_batch(self, batch: list[EditJob]) -> None:
        live = self._live(batch)
        if not live:
            return
        self._metrics.batch_ran(len(live))
        start = time.perf_counter()
        items = [EditItem(job.render, job.original, job.params, job.original_key, job.is_active) for job in live]
        results: list[object]
        if len(live) == 1:
            results = [self._one(items[0])]
        else:
            try:
                results = list(self._backend.edit_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(f"edit_batch returned {len(results)} results for {len(items)} edits")
            except Exception as e:  # noqa: BLE001 - a failed batch: retry one by one, so each edit gets its own outcome
                log.warning(
                    "batch of %d failed (%s: %s); running its edits one by one", len(items), type(e).__name__, e
                )
                results = [self._one(item) for item in items]
        computed = time.perf_counter()
        for job, result in zip(live, results):
            try:
                if isinstance(result, BaseException):
                    raise _backend_error(job, result)
                assert isinstance(result, EditResult)
                edited = encode_output(result.image, job.render.shape, job.uint8_out)
            except RequestError as e:
                job.future.set_exception(e)
                continue
            done = time.perf_counter()
            self._metrics.edit_done(start - job.arrival, computed - start, done - job.arrival)
            job.future.set_result(
                pb.EditResponse(
                    request_id=job.request_id,
                    view_id=job.view_id,
                    edited=edited,
                    timings=pb.Timings(
                        queue_ms=(start - job.arrival) * 1e3,
                        compute_ms=(computed - start) * 1e3,
                        total_ms=(done - job.arrival) * 1e3,
                    ),
                    timestep=max(0, int(result.timestep)),
                )
            )

    def _one(self, item: EditItem) -> object:
        """One edit through the backend's own path (`edit` for backends without batching)."""
        try:
            if self._backend.supports_batching:
                return self._backend.edit_batch([item])[0]
            return self._backend.edit(item.render, item.original, item.params)
        except Exception as e:  # noqa: BLE001 - reported per edit
            return e

    def drain(self, timeout_s: float) -> bool:
        """Refuse new edits (UNAVAILABLE); wait up to timeout_s for the queued and running ones. True if all finished."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._draining = True
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Cancel queued edits; the running batch finishes on its own."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._cond.notify_all()
        for job in queued:
            job.future.cancel()

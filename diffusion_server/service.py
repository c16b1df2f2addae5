"""The in2n.v1.EditService servicer (asyncio: it runs on a `grpc.aio` server's event loop).

Requests are validated on a small thread pool (images decoded, numbers range-checked,
originals' keys checked, `backend.check` asked), then handed to `EditWorker`, the one
thread that owns the backend: it takes up to `max_batch` queued edits at a time (waiting
at most `max_delay_s` for more to arrive) and runs them as one `edit_batch` call where
the backend supports batching, one by one otherwise. RPCs await the edits' futures: a
waiting call holds no thread, so open streams cannot starve health checks or unary calls.

Streams are bounded three ways: at most `max_streams` are open (a new one beyond gets
RESOURCE_EXHAUSTED at once); one idle longer than `stream_idle_timeout_s` (no request read
and nothing of its own unanswered) is closed with UNAVAILABLE; and a stream's backlog
(requests read whose response is not yet handed to gRPC: edits in flight plus answers the
client has not taken) is at most `max_stream_backlog`: at the bound the server stops reading
that stream's requests until the client reads (back-pressure, rather than refusing: a slow
reader loses nothing, and its requests wait in its own send window). Everything a stream
holds is dropped when it ends.

Before computing, the worker drops what nobody waits for any more: an edit whose
deadline has passed fails with DEADLINE_EXCEEDED, one whose client cancelled or
went away is cancelled. Originals a client sends with `client_id` and
`original_key` are cached (`OriginalCache`), so later requests may carry only the render;
the key must be the original's (`wire_original_key`, checked), and the client id, a
secret, is shown only as a short hash (`client_tag`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Deque, Hashable, List, Optional, Set, Tuple

import grpc
import numpy as np

import diffusion_server
from diffusion_server import codec
from diffusion_server.backends.base import EditBackend, EditCancelled, EditItem, EditRejected, EditResult
from diffusion_server.client import original_key
from in2n_contract import (
    DEFAULT_DIFFUSION_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    ORIGINAL_NOT_CACHED,
    ORIGINAL_REQUIRED,
    SERVICE_NAME,
    EditParams,
    max_message_bytes_for,
    pb,
    pb_grpc,
)

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 1000
MAX_REQUEST_ID_CHARS = 256
MAX_CLIENT_ID_CHARS = 256
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class ServiceLimits:
    """What the service accepts and how it schedules."""

    max_image_side: int = 2048
    max_diffusion_steps: int = 1000
    max_queued: int = 32
    max_batch: int = 1
    max_delay_s: float = 0.0
    original_cache_bytes: int = 1 << 30
    max_streams: int = 64
    stream_idle_timeout_s: float = 600.0  # 0: never
    max_stream_backlog: int = 32
    request_threads: int = 16  # validate and decode requests

    @property
    def max_message_bytes(self) -> int:
        return max_message_bytes_for(self.max_image_side)


class RequestError(Exception):
    """A request that fails with a gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def client_tag(client_id: str) -> str:
    """What logs and messages show of a client id: a short hash prefix. The id itself is a secret
    (whoever knows it may use that client's cached originals), so it is never written out."""
    return "#" + hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]


_WIRE_DTYPES = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT16: np.dtype("<f2"), pb.DTYPE_FLOAT32: np.dtype("<f4")}


def wire_original_key(image: pb.Image) -> str:
    """`client.original_key` of an image as it travelled (its shape, dtype and bytes): what an honest
    client sends as `original_key` with it. `image` must have passed `codec.decode_image`."""
    array = np.frombuffer(image.data, dtype=_WIRE_DTYPES[image.dtype]).reshape(image.height, image.width, image.channels)
    return original_key(array)


def _short(text: str, limit: int = 80) -> str:
    """repr of `text` cut to `limit` characters, for log lines (a hostile request_id may be megabytes long)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class MalformedMessage:
    """A request message that did not parse (not protobuf, truncated, bad UTF-8 in a text field, ...).

    The tolerant deserializers of `add_edit_service` hand it to the servicer instead of raising, so the
    client gets INVALID_ARGUMENT saying what was wrong (gRPC would answer INTERNAL "Exception
    deserializing request!" and log a traceback), and a stream stays open (one EditError for that message).
    """

    type_name: str
    size: int
    error: str

    def message(self) -> str:
        return f"request is not a valid {self.type_name} message ({self.size} bytes): {self.error}"


def _tolerant(message_class: type) -> Callable[[bytes], object]:
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, RecursionError (nested groups), ...
            if isinstance(e, RecursionError):
                detail = "nested too deeply"
            else:
                detail = " ".join(str(e).split()) or "unparseable"
            if len(detail) > 300:
                detail = detail[:300] + "..."
            return MalformedMessage(type_name, len(data), f"{type(e).__name__}: {detail}")

    return deserialize


def add_edit_service(servicer: "EditServicer", server: grpc.Server) -> None:
    """Register `servicer` on `server` as in2n.v1.EditService (what the generated
    `add_EditServiceServicer_to_server` does, with tolerant request deserializers: see `MalformedMessage`)."""
    handlers = {
        "StreamEdit": grpc.stream_stream_rpc_method_handler(
            servicer.StreamEdit,
            request_deserializer=_tolerant(pb.StreamEditRequest),
            response_serializer=pb.StreamEditResponse.SerializeToString,
        ),
        "Edit": grpc.unary_unary_rpc_method_handler(
            servicer.Edit,
            request_deserializer=_tolerant(pb.EditRequest),
            response_serializer=pb.EditResponse.SerializeToString,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=_tolerant(pb.DescribeRequest),
            response_serializer=pb.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _always_active() -> bool:
    return True


@dataclass(eq=False)
class EditJob:
    """One validated edit, ready for the worker."""

    request_id: str
    view_id: int
    render: np.ndarray  # [H, W, 3] float32 in [0, 1]; uint8 0..255 as sent, for a backend that accepts_uint8
    original: np.ndarray  # the same
    params: EditParams
    uint8_out: bool  # answer in uint8 because the render came as uint8
    arrival: float  # time.perf_counter() when the request arrived
    original_key: Optional[Hashable] = None  # (client_id, view_id, key) when the original is cached
    deadline: Optional[float] = None  # time.perf_counter() after which the edit is not worth computing
    is_active: Callable[[], bool] = _always_active  # False once the client is gone
    future: "concurrent.futures.Future[pb.EditResponse]" = field(default_factory=concurrent.futures.Future)


class OriginalCache:
    """Originals by (client_id, view_id), least recently used evicted beyond `max_bytes`; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: "collections.OrderedDict[Tuple[str, int], Tuple[str, np.ndarray]]" = collections.OrderedDict()
        self._bytes = 0

    def put(self, client_id: str, view_id: int, key: str, image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop((client_id, view_id), None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._items[(client_id, view_id)] = (key, image)
            self._bytes += image.nbytes
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def get(self, client_id: str, view_id: int, key: str) -> Optional[np.ndarray]:
        with self._lock:
            entry = self._items.get((client_id, view_id))
            if entry is None or entry[0] != key:
                return None
            self._items.move_to_end((client_id, view_id))
            return entry[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _optional_float(req: pb.EditRequest, name: str, default: float, low: float, high: float) -> float:
    if not req.HasField(name):
        return default
    value = float(getattr(req, name))
    if not (math.isfinite(value) and low <= value <= high):
        raise _invalid(f"{name} must be finite and in [{low:g}, {high:g}], got {value}")
    return value


def parse_request(
    req: pb.EditRequest,
    limits: ServiceLimits,
    backend: EditBackend,
    arrival: float,
    originals: Optional[OriginalCache] = None,
) -> EditJob:
    """Validate `req` and decode its images.

    Raises `RequestError`: INVALID_ARGUMENT naming the bad field, or FAILED_PRECONDITION
    ("original not cached ...") for a request without original whose original the server does not hold.
    A valid request with `original`, `client_id` and `original_key` puts its original in `originals`.
    """
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(req.request_id)}")
    if len(req.client_id) > MAX_CLIENT_ID_CHARS:
        raise _invalid(f"client_id must be at most {MAX_CLIENT_ID_CHARS} characters, got {len(req.client_id)}")
    if req.original_key and not req.client_id:
        raise _invalid("client_id is required with original_key (originals are cached per client)")
    if not req.instruction.strip():
        raise _invalid("instruction must be a non-empty text")
    if len(req.instruction) > MAX_INSTRUCTION_CHARS:
        raise _invalid(f"instruction must be at most {MAX_INSTRUCTION_CHARS} characters, got {len(req.instruction)}")
    guidance = _optional_float(req, "guidance_scale", DEFAULT_GUIDANCE_SCALE, 0.0, MAX_GUIDANCE)
    image_guidance = _optional_float(req, "image_guidance_scale", DEFAULT_IMAGE_GUIDANCE_SCALE, 0.0, MAX_GUIDANCE)
    steps = req.diffusion_steps if req.HasField("diffusion_steps") else DEFAULT_DIFFUSION_STEPS
    if not 1 <= steps <= limits.max_diffusion_steps:
        raise _invalid(f"diffusion_steps must be in [1, {limits.max_diffusion_steps}], got {steps}")
    lower = _optional_float(req, "lower_bound", DEFAULT_LOWER_BOUND, 0.0, 1.0)
    upper = _optional_float(req, "upper_bound", DEFAULT_UPPER_BOUND, 0.0, 1.0)
    if lower > upper:
        raise _invalid(f"lower_bound ({lower:g}) must be <= upper_bound ({upper:g})")
    seed = req.seed if req.HasField("seed") else None

    if not req.HasField("render"):
        raise _invalid("render is required")
    if not req.HasField("original") and not req.original_key:
        raise _invalid(f"{ORIGINAL_REQUIRED} (or original_key, for an original sent before)")
    try:
        keep = backend.accepts_uint8
        render = codec.decode_image(req.render, "render", max_side=limits.max_image_side, keep_uint8=keep)
        original = (
            codec.decode_image(req.original, "original", max_side=limits.max_image_side, keep_uint8=keep)
            if req.HasField("original")
            else None
        )
    except codec.ImageFormatError as e:
        raise _invalid(str(e)) from None
    if original is not None and req.original_key and req.original_key != wire_original_key(req.original):
        # Without this check, whoever learnt a client's id could replace that client's cached original.
        raise _invalid(
            f"original_key {_short(req.original_key, 40)} does not match the original sent with it; "
            "send original_key(original) as computed by diffusion_server.client (a hash of the image as it travels)"
        )
    if original is None:
        original = originals.get(req.client_id, req.view_id, req.original_key) if originals is not None else None
        if original is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{ORIGINAL_NOT_CACHED} for client {client_tag(req.client_id)}, view {req.view_id}, "
                f"key {_short(req.original_key, 40)}; "
                "send the request again with original set",
            )
    if render.shape != original.shape:
        raise _invalid(
            f"original: size {original.shape[0]}x{original.shape[1]} must match render's {render.shape[0]}x{render.shape[1]}"
        )

    params = EditParams(
        instruction=req.instruction,
        guidance_scale=guidance,
        image_guidance_scale=image_guidance,
        diffusion_steps=int(steps),
        lower_bound=lower,
        upper_bound=upper,
        seed=seed,
    )
    try:
        backend.check(params)
    except EditRejected as e:
        raise _invalid(str(e)) from None
    if req.HasField("original") and req.original_key and originals is not None:
        originals.put(req.client_id, req.view_id, req.original_key, original)
    deadline = None
    if req.HasField("timeout_ms") and req.timeout_ms > 0:
        deadline = arrival + req.timeout_ms / 1e3
    return EditJob(
        request_id=req.request_id,
        view_id=req.view_id,
        render=render,
        original=original,
        params=params,
        uint8_out=req.render.dtype == pb.DTYPE_UINT8,
        arrival=arrival,
        original_key=(req.client_id, req.view_id, req.original_key) if req.original_key else None,
        deadline=deadline,
    )


def _encode_output(image: np.ndarray, shape: tuple, uint8_out: bool) -> pb.Image:
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
    log.error("backend failed on request %r (view %d): %s: %s", job.request_id, job.view_id, type(error).__name__, error,
              exc_info=(type(error), error, error.__traceback__))
    return RequestError(grpc.StatusCode.INTERNAL, f"backend error: {type(error).__name__}: {error}")


def _deadline_from(context: grpc.ServicerContext, arrival: float) -> Optional[float]:
    """The call's deadline as a time.perf_counter() value, None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return arrival + max(0.0, remaining)


class EditWorker:
    """The single thread that owns the backend: takes batches of queued edits and runs them."""

    def __init__(
        self,
        backend: EditBackend,
        max_queued: int,
        max_batch: int = 1,
        max_delay_s: float = 0.0,
        metrics: Optional[object] = None,
    ):
        self._backend = backend
        self._max_queued = max_queued
        self._max_batch = max_batch if getattr(backend, "supports_batching", False) else 1
        self._max_delay_s = max_delay_s
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queue: Deque[EditJob] = collections.deque()
        self._pending = 0  # queued or running
        self._closed = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="edit-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def submit(self, job: EditJob) -> "concurrent.futures.Future[pb.EditResponse]":
        """Queue `job`; raises RequestError: RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when stopping."""
        with self._cond:
            if self._closed or self._draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another server or later")
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
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))  # type: ignore[attr-defined]
            self._metrics.in_progress.set(self._pending)  # type: ignore[attr-defined]

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

    def _take_batch(self) -> Optional[List[EditJob]]:
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
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception:  # noqa: BLE001 - never let the worker die
                log.exception("edit worker failure")
                for job in batch:
                    if not job.future.done():
                        try:
                            job.future.set_exception(RequestError(grpc.StatusCode.INTERNAL, "edit worker failure"))
                        except concurrent.futures.InvalidStateError:
                            pass

    def _live(self, batch: List[EditJob]) -> List[EditJob]:
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
                    RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed after {waited:.0f} ms in the queue; not computed")
                )
                continue
            live.append(job)
        return live

    def _run_batch(self, batch: List[EditJob]) -> None:
        live = self._live(batch)
        if not live:
            return
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(live))  # type: ignore[attr-defined]
        start = time.perf_counter()
        items = [EditItem(job.render, job.original, job.params, job.original_key, job.is_active) for job in live]
        results: List[object]
        if len(live) == 1:
            results = [self._one(items[0])]
        else:
            try:
                results = list(self._backend.edit_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(f"edit_batch returned {len(results)} results for {len(items)} edits")
            except Exception as e:  # noqa: BLE001 - a failed batch: retry one by one, so each edit gets its own outcome
                log.warning("batch of %d failed (%s: %s); running its edits one by one", len(items), type(e).__name__, e)
                results = [self._one(item) for item in items]
        computed = time.perf_counter()
        for job, result in zip(live, results):
            try:
                if isinstance(result, BaseException):
                    raise _backend_error(job, result)
                assert isinstance(result, EditResult)
                edited = _encode_output(result.image, job.render.shape, job.uint8_out)
            except RequestError as e:
                job.future.set_exception(e)
                continue
            done = time.perf_counter()
            if self._metrics is not None:
                self._metrics.edit_done(start - job.arrival, computed - start, done - job.arrival)  # type: ignore[attr-defined]
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


class _Stream:
    """Book-keeping of one StreamEdit call. Lives on the server's event loop: other threads touch it only
    through `post` (and read `closed`, `unanswered`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_backlog: int):
        self.loop = loop
        self.out: "asyncio.Queue[object]" = asyncio.Queue()  # responses and markers for the writer
        self.in_flight: Set[str] = set()  # request ids of accepted edits not answered yet
        self.futures: Set[concurrent.futures.Future] = set()
        self.max_backlog = max_backlog
        self.backlog = 0  # requests read whose response is not yet handed to gRPC
        self.room = asyncio.Event()  # set while backlog < max_backlog
        self.room.set()
        self.unanswered = 0  # accepted edits whose response is not queued yet (a drain waits for these)
        self.closed = False  # the call ended: drop whatever comes back
        self.last_activity = loop.time()  # last request read or response sent

    def post(self, callback: Callable[..., None], *args: object) -> None:
        """Run `callback(*args)` on the stream's loop, from any thread (nothing if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    def took(self) -> None:
        """One request read: its response joins the backlog."""
        self.backlog += 1
        self.last_activity = self.loop.time()
        if self.backlog >= self.max_backlog:
            self.room.clear()

    def sent(self) -> None:
        """One response handed to gRPC."""
        self.backlog -= 1
        self.last_activity = self.loop.time()
        if self.backlog < self.max_backlog:
            self.room.set()


@dataclass
class _EndOfInput:
    count: int  # requests read from the stream; each gets exactly one response


_DRAINED = object()  # the server is stopping and every accepted edit has been answered: end the stream


def _error_response(request_id: str, view_id: int, error: RequestError) -> pb.StreamEditResponse:
    return pb.StreamEditResponse(
        request_id=request_id,
        view_id=view_id,
        error=pb.EditError(code=error.code.value[0], message=error.message),
    )


async def _wait(future: concurrent.futures.Future) -> None:
    """Wait on the event loop until `future` (completed by another thread) is done; cancelling the wait cancels it."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def notify(_future: concurrent.futures.Future) -> None:
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    future.add_done_callback(notify)
    try:
        await done
    except asyncio.CancelledError:
        future.cancel()
        raise


class EditServicer(pb_grpc.EditServiceServicer):
    """Serves Edit, StreamEdit and Describe over one backend (coroutines, on a grpc.aio server's loop)."""

    def __init__(
        self,
        backend: EditBackend,
        limits: ServiceLimits = ServiceLimits(),
        metrics: Optional[object] = None,
    ):
        self._backend = backend
        self._backend_name = backend.name or type(backend).__name__  # what Describe reports
        self._limits = limits
        self._info = backend.info()
        self._metrics = metrics
        self._worker = EditWorker(backend, limits.max_queued, limits.max_batch, limits.max_delay_s, metrics)
        self._originals = OriginalCache(limits.original_cache_bytes) if limits.original_cache_bytes > 0 else None
        self._requests = concurrent.futures.ThreadPoolExecutor(limits.request_threads, thread_name_prefix="request")
        self._streams_lock = threading.Lock()
        self._streams: Set[_Stream] = set()
        self._refusals = 0  # streams refused since the last log line about it (on the loop)
        self._refusal_logged = -math.inf  # time.monotonic() of that line

    @property
    def worker(self) -> EditWorker:
        return self._worker

    @property
    def open_streams(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    def close(self) -> None:
        self._worker.close()
        self._requests.shutdown(wait=False, cancel_futures=True)

    def drain(self, timeout_s: float) -> bool:
        """Stop taking edits, answer those accepted (up to timeout_s), then end every open stream.

        Returns True if every accepted edit was answered in time. Called from a thread other than the loop's.
        """
        deadline = time.monotonic() + timeout_s
        finished = self._worker.drain(timeout_s)
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            # An edit's response is queued (on the loop) just after its job is released: wait for those last few.
            while finished and stream.unanswered > 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            stream.post(stream.out.put_nowait, _DRAINED)
        return finished

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.request_done(method, code.name)  # type: ignore[attr-defined]

    async def _parse(self, req: pb.EditRequest, arrival: float) -> EditJob:
        """`parse_request` on the request threads (decoding and hashing images would stall the loop)."""
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(self._requests, parse_request, req, self._limits, self._backend, arrival, self._originals)
        except RuntimeError:  # the pool is shut down: close() was called
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another server or later") from None
        return await pending

    # -- Describe --------------------------------------------------------------------------------

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        return pb.DescribeResponse(
            backend=self._backend_name,
            model=self._info.model,
            device=self._info.device,
            precision=self._info.precision,
            max_image_side=self._limits.max_image_side,
            max_message_bytes=self._limits.max_message_bytes,
            max_diffusion_steps=self._limits.max_diffusion_steps,
            known_instructions=list(self._info.known_instructions),
            server_version=diffusion_server.__version__,
            max_batch=self._limits.max_batch if self._backend.supports_batching else 1,
            caches_originals=self._originals is not None,
        )

    # -- Edit (unary) ----------------------------------------------------------------------------

    async def Edit(self, request: pb.EditRequest, context: grpc.aio.ServicerContext) -> pb.EditResponse:
        arrival = time.perf_counter()
        if isinstance(request, MalformedMessage):
            log.info("Edit rejected: %s", request.message(), extra={"event": "rejected", "code": "INVALID_ARGUMENT"})
            self._count("Edit", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        gone = threading.Event()  # the call ended (answered, cancelled, deadline): read by the worker thread
        try:
            job = await self._parse(request, arrival)
            call_deadline = _deadline_from(context, arrival)
            if call_deadline is not None:
                job.deadline = call_deadline if job.deadline is None else min(job.deadline, call_deadline)
            job.is_active = lambda: not gone.is_set()
            future = self._worker.submit(job)
        except RequestError as e:
            log.info("Edit %s rejected: %s", _short(request.request_id), e.message,
                     extra={"event": "rejected", "request_id": request.request_id, "code": e.code.name})
            self._count("Edit", e.code)
            await context.abort(e.code, e.message)

        def ended(_context: object) -> None:  # client gone: drop the job if it has not started
            gone.set()
            future.cancel()

        context.add_done_callback(ended)

        def ended_code() -> grpc.StatusCode:
            expired = job.deadline is not None and time.perf_counter() >= job.deadline
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

        try:
            await _wait(future)
        except asyncio.CancelledError:  # the call ended first: the client cancelled, or its deadline passed
            self._count("Edit", ended_code())
            raise
        if future.cancelled():
            code = ended_code()
            self._count("Edit", code)
            await context.abort(code, "deadline passed; not computed" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "edit cancelled")
        error = future.exception()
        if error is not None:
            if not isinstance(error, RequestError):
                log.error("unexpected failure of request %s: %r", _short(request.request_id), error)
                error = RequestError(grpc.StatusCode.INTERNAL, str(error))
            self._count("Edit", error.code)
            await context.abort(error.code, error.message)
        self._count("Edit", grpc.StatusCode.OK)
        return future.result()

    # -- StreamEdit ------------------------------------------------------------------------------

    async def StreamEdit(
        self, request_iterator: AsyncIterator[pb.StreamEditRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Coroutine handler (writes with `context.write`): a write that fails because the client went away
        ends the call quietly, where a generator handler would have grpc log a traceback."""
        limits = self._limits
        stream = _Stream(asyncio.get_running_loop(), limits.max_stream_backlog)
        with self._streams_lock:
            refused = len(self._streams) >= limits.max_streams
            if not refused:
                self._streams.add(stream)
                open_now = len(self._streams)
        if refused:
            self._refusals += 1
            now = time.monotonic()
            if now - self._refusal_logged >= 10.0:  # one line per 10 s at most: a flood of streams must not flood the log
                log.info("StreamEdit refused: %d streams open (--max-streams); %d refused since the last such line",
                         limits.max_streams, self._refusals, extra={"event": "stream_refused", "code": "RESOURCE_EXHAUSTED"})
                self._refusal_logged, self._refusals = now, 0
            if self._metrics is not None:
                self._metrics.streams_refused.inc()  # type: ignore[attr-defined]
            self._count("StreamEdit", grpc.StatusCode.RESOURCE_EXHAUSTED)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams: the server's limit of {limits.max_streams} open StreamEdit streams "
                "(--max-streams) is reached; close a stream or retry later",
            )
        if self._metrics is not None:
            self._metrics.streams_open.set(open_now)  # type: ignore[attr-defined]
        reader = asyncio.create_task(self._read_stream(request_iterator, stream, context))
        idle_s = limits.stream_idle_timeout_s
        expected: Optional[int] = None
        sent = 0
        try:
            while expected is None or sent < expected:
                timeout = None
                if idle_s > 0 and stream.backlog == 0:  # nothing of its own in flight: the idle clock runs
                    timeout = max(0.0, stream.last_activity + idle_s - stream.loop.time())
                item = await self._next(stream, timeout)
                if item is None:  # no item within the timeout
                    if stream.backlog == 0 and stream.loop.time() - stream.last_activity >= idle_s:
                        break
                    continue
                if item is _DRAINED:
                    return
                if isinstance(item, _EndOfInput):
                    expected = item.count
                    continue
                try:
                    await context.write(item)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the client cancelled or the connection broke mid-write
                    log.debug("StreamEdit write failed: %s", e)
                    raise asyncio.CancelledError() from e
                sent += 1
                stream.sent()
            else:
                return
        finally:
            self._end_stream(stream, reader)
        # Idle: the loop above broke out.
        log.info("StreamEdit closed after %.0f s idle (--stream-idle-timeout-s)", idle_s, extra={"event": "stream_idle"})
        if self._metrics is not None:
            self._metrics.streams_idle_closed.inc()  # type: ignore[attr-defined]
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"stream idle for {idle_s:g} s (no request and nothing in flight; the server's --stream-idle-timeout-s): "
            "closed by the server; open a new stream to send more edits",
        )

    @staticmethod
    async def _next(stream: _Stream, timeout: Optional[float]) -> Optional[object]:
        """The next item of `stream.out`; None if none came within `timeout` seconds (None: wait as long as it takes).

        Not `asyncio.wait_for`: on Python 3.11 it loses a cancellation that arrives as the item does (the
        client cancelling just as its request stream ends), and the stream would then wait forever.
        """
        if timeout is None:
            return await stream.out.get()
        getter = asyncio.ensure_future(stream.out.get())
        try:
            await asyncio.wait((getter,), timeout=timeout)
        finally:
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    def _end_stream(self, stream: _Stream, reader: "asyncio.Task[None]") -> None:
        """The call is over: forget the stream, stop its reader, cancel its edits, drop its queued responses."""
        stream.closed = True
        reader.cancel()
        with self._streams_lock:
            self._streams.discard(stream)
            open_now = len(self._streams)
        if self._metrics is not None:
            self._metrics.streams_open.set(open_now)  # type: ignore[attr-defined]
        futures, stream.futures = list(stream.futures), set()
        for future in futures:
            future.cancel()
        while not stream.out.empty():
            stream.out.get_nowait()

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.StreamEditRequest],
        stream: _Stream,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Read the client's requests and submit each; every request read yields exactly one response.
        While the stream's backlog is at its bound, read nothing (back-pressure)."""
        count = 0
        try:
            async for stream_request in requests:
                count += 1
                stream.took()
                arrival = time.perf_counter()
                malformed = stream_request if isinstance(stream_request, MalformedMessage) else None
                req = pb.EditRequest() if malformed is not None else stream_request.edit
                try:
                    if malformed is not None:
                        raise _invalid(malformed.message())
                    if not stream_request.HasField("edit"):
                        raise _invalid("edit is required in every StreamEditRequest")
                    if not req.request_id:
                        raise _invalid("request_id must be non-empty in StreamEdit (responses are matched by it)")
                    if req.request_id in stream.in_flight:
                        raise _invalid(f"request_id {_short(req.request_id)} is already in flight on this stream")
                    stream.in_flight.add(req.request_id)
                    try:
                        job = await self._parse(req, arrival)
                        call_deadline = _deadline_from(context, arrival)
                        if call_deadline is not None:
                            job.deadline = call_deadline if job.deadline is None else min(job.deadline, call_deadline)
                        job.is_active = lambda: not stream.closed
                        future = self._worker.submit(job)
                    except BaseException:
                        stream.in_flight.discard(req.request_id)
                        raise
                except RequestError as e:
                    log.info("StreamEdit request %s rejected: %s", _short(req.request_id), e.message,
                             extra={"event": "rejected", "request_id": req.request_id, "code": e.code.name})
                    self._count("StreamEdit", e.code)
                    stream.out.put_nowait(_error_response(req.request_id, req.view_id, e))
                else:
                    stream.futures.add(future)
                    stream.unanswered += 1
                    future.add_done_callback(
                        lambda f, rid=req.request_id, vid=req.view_id: self._on_stream_done(f, rid, vid, stream)
                    )
                if not stream.room.is_set():  # back-pressure: read on once the client has taken a response
                    await self._paused(stream)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the client cancelled or the connection broke
            log.debug("StreamEdit request stream ended: %s", e)
        finally:
            if not stream.closed:
                stream.out.put_nowait(_EndOfInput(count))

    async def _paused(self, stream: _Stream) -> None:
        """Wait (reading nothing) until `stream`'s backlog is below its bound."""
        if self._metrics is not None:
            self._metrics.streams_paused.inc()  # type: ignore[attr-defined]
        try:
            await stream.room.wait()
        finally:
            if self._metrics is not None:
                self._metrics.streams_paused.dec()  # type: ignore[attr-defined]

    def _on_stream_done(self, future: concurrent.futures.Future, request_id: str, view_id: int, stream: _Stream) -> None:
        """An accepted edit of `stream` finished (on the thread that finished it): count it, queue its response on the loop."""
        if future.cancelled():
            error: Optional[BaseException] = RequestError(grpc.StatusCode.CANCELLED, "edit cancelled")
        else:
            error = future.exception()
        if error is None:
            response = pb.StreamEditResponse(request_id=request_id, view_id=view_id, edited=future.result())
            self._count("StreamEdit", grpc.StatusCode.OK)
        else:
            if not isinstance(error, RequestError):
                log.error("unexpected failure of request %s: %r", _short(request_id), error)
                error = RequestError(grpc.StatusCode.INTERNAL, str(error))
            response = _error_response(request_id, view_id, error)
            self._count("StreamEdit", error.code)
        stream.post(self._queue_response, future, request_id, response, stream)

    @staticmethod
    def _queue_response(
        future: concurrent.futures.Future, request_id: str, response: pb.StreamEditResponse, stream: _Stream
    ) -> None:
        """On the loop: hand an edit's response to the stream's writer (nothing if the stream has ended)."""
        stream.in_flight.discard(request_id)
        stream.futures.discard(future)
        stream.unanswered -= 1
        if not stream.closed:
            stream.out.put_nowait(response)

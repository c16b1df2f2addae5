"""The in2n.v1.EditService servicer.

Requests are validated on the RPC threads (images decoded, numbers range-checked,
`backend.check` asked), then handed to `EditWorker`, the one thread that owns
the backend: a device runs one edit at a time. RPC threads wait on futures.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Set

import grpc
import numpy as np

import diffusion_server
from diffusion_server import codec
from diffusion_server.backends.base import (
    DEFAULT_DIFFUSION_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    EditBackend,
    EditParams,
    EditRejected,
)
from diffusion_server.config import max_message_bytes_for
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 1000
MAX_REQUEST_ID_CHARS = 256
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class ServiceLimits:
    """What the service accepts."""

    max_image_side: int = 2048
    max_diffusion_steps: int = 1000
    max_queued: int = 32

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


@dataclass
class EditJob:
    """One validated edit, ready for the worker."""

    request_id: str
    view_id: int
    render: np.ndarray  # [H, W, 3] float32 in [0, 1]
    original: np.ndarray  # [H, W, 3] float32 in [0, 1]
    params: EditParams
    uint8_out: bool  # answer in uint8 because the render came as uint8
    arrival: float  # time.perf_counter() when the request arrived


def _optional_float(req: pb.EditRequest, name: str, default: float, low: float, high: float) -> float:
    if not req.HasField(name):
        return default
    value = float(getattr(req, name))
    if not (math.isfinite(value) and low <= value <= high):
        raise _invalid(f"{name} must be finite and in [{low:g}, {high:g}], got {value}")
    return value


def parse_request(req: pb.EditRequest, limits: ServiceLimits, backend: EditBackend, arrival: float) -> EditJob:
    """Validate `req` and decode its images; raises `RequestError` (INVALID_ARGUMENT) naming the bad field."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(req.request_id)}")
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

    for name in ("render", "original"):
        if not req.HasField(name):
            raise _invalid(f"{name} is required")
    try:
        render = codec.decode_image(req.render, "render", max_side=limits.max_image_side)
        original = codec.decode_image(req.original, "original", max_side=limits.max_image_side)
    except codec.ImageFormatError as e:
        raise _invalid(str(e)) from None
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
    return EditJob(
        request_id=req.request_id,
        view_id=req.view_id,
        render=render,
        original=original,
        params=params,
        uint8_out=req.render.dtype == pb.DTYPE_UINT8,
        arrival=arrival,
    )


def _encode_output(image: np.ndarray, shape: tuple, uint8_out: bool) -> pb.Image:
    """Backend output [H, W, 3] -> wire image; raises RequestError (INTERNAL) on a malformed output."""
    image = np.asarray(image)
    if image.shape != shape:
        raise RequestError(grpc.StatusCode.INTERNAL, f"backend returned shape {image.shape}, expected {shape}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise RequestError(grpc.StatusCode.INTERNAL, "backend returned NaN or infinite values")
    image = np.clip(image, 0.0, 1.0)
    if uint8_out:
        return codec.encode_image(np.round(image * 255.0).astype(np.uint8))
    return codec.encode_image(image)


class EditWorker:
    """The single thread that owns the backend and runs one edit at a time."""

    def __init__(self, backend: EditBackend, max_queued: int):
        self._backend = backend
        self._max_queued = max_queued
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edit-worker")
        self._lock = threading.Lock()
        self._pending = 0  # queued or running

    def submit(self, job: EditJob) -> "concurrent.futures.Future[pb.EditResponse]":
        """Queue `job`; raises RequestError (RESOURCE_EXHAUSTED) when the queue is full."""
        with self._lock:
            if self._pending >= self._max_queued:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server queue is full ({self._max_queued} edits queued or running); retry later",
                )
            self._pending += 1
        try:
            future = self._executor.submit(self._run, job)
        except RuntimeError as e:  # executor shut down
            with self._lock:
                self._pending -= 1
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"server is shutting down ({e})") from None
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, job: EditJob) -> pb.EditResponse:
        start = time.perf_counter()
        try:
            result = self._backend.edit(job.render, job.original, job.params)
        except EditRejected as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:  # noqa: BLE001 - any backend failure becomes INTERNAL; the server keeps serving
            log.exception("backend failed on request %r (view %d)", job.request_id, job.view_id)
            raise RequestError(grpc.StatusCode.INTERNAL, f"backend error: {type(e).__name__}: {e}") from None
        computed = time.perf_counter()
        edited = _encode_output(result.image, job.render.shape, job.uint8_out)
        done = time.perf_counter()
        return pb.EditResponse(
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

    def close(self) -> None:
        """Cancel queued edits; the running one finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _StreamState:
    """Book-keeping of one StreamEdit call."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: Set[str] = field(default_factory=set)
    futures: List[concurrent.futures.Future] = field(default_factory=list)
    cancelled: bool = False


@dataclass
class _EndOfInput:
    count: int  # requests read from the stream; each gets exactly one response


_TERMINATED = object()  # the RPC ended (client cancelled, deadline, server stopping)


def _error_response(request_id: str, view_id: int, error: RequestError) -> pb.StreamEditResponse:
    return pb.StreamEditResponse(
        request_id=request_id,
        view_id=view_id,
        error=pb.EditError(code=error.code.value[0], message=error.message),
    )


class EditServicer(pb_grpc.EditServiceServicer):
    """Serves Edit, StreamEdit and Describe over one backend."""

    def __init__(self, backend: EditBackend, backend_name: str, limits: ServiceLimits = ServiceLimits()):
        self._backend = backend
        self._backend_name = backend_name
        self._limits = limits
        self._info = backend.info()
        self._worker = EditWorker(backend, limits.max_queued)

    def close(self) -> None:
        self._worker.close()

    # -- Describe --------------------------------------------------------------------------------

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
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
        )

    # -- Edit (unary) ----------------------------------------------------------------------------

    def Edit(self, request: pb.EditRequest, context: grpc.ServicerContext) -> pb.EditResponse:
        arrival = time.perf_counter()
        try:
            future = self._worker.submit(parse_request(request, self._limits, self._backend, arrival))
        except RequestError as e:
            log.info("Edit %r rejected: %s", request.request_id, e.message)
            context.abort(e.code, e.message)
        context.add_callback(future.cancel)  # client gone: drop the job if it has not started
        try:
            return future.result()
        except RequestError as e:
            context.abort(e.code, e.message)
        except concurrent.futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "edit cancelled")

    # -- StreamEdit ------------------------------------------------------------------------------

    def StreamEdit(
        self, request_iterator: Iterator[pb.StreamEditRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamEditResponse]:
        out: "queue.Queue[object]" = queue.Queue()
        state = _StreamState()
        if not context.add_callback(lambda: out.put(_TERMINATED)):
            return
        reader = threading.Thread(
            target=self._read_stream, args=(request_iterator, out, state), name="stream-reader", daemon=True
        )
        reader.start()
        expected: Optional[int] = None
        sent = 0
        try:
            while expected is None or sent < expected:
                item = out.get()
                if item is _TERMINATED:
                    return
                if isinstance(item, _EndOfInput):
                    expected = item.count
                    continue
                yield item
                sent += 1
        finally:
            with state.lock:  # drop whatever this stream still has queued
                state.cancelled = True
                futures = list(state.futures)
            for future in futures:
                future.cancel()

    def _read_stream(self, requests: Iterator[pb.StreamEditRequest], out: "queue.Queue[object]", state: _StreamState) -> None:
        """Read the client's requests and submit each; every request read yields exactly one response."""
        count = 0
        try:
            for stream_request in requests:
                count += 1
                arrival = time.perf_counter()
                req = stream_request.edit
                try:
                    if not req.request_id:
                        raise _invalid("request_id must be non-empty in StreamEdit (responses are matched by it)")
                    with state.lock:
                        if req.request_id in state.in_flight:
                            raise _invalid(f"request_id {req.request_id!r} is already in flight on this stream")
                        state.in_flight.add(req.request_id)
                    try:
                        future = self._worker.submit(parse_request(req, self._limits, self._backend, arrival))
                    except RequestError:
                        with state.lock:
                            state.in_flight.discard(req.request_id)
                        raise
                except RequestError as e:
                    log.info("StreamEdit request %r rejected: %s", req.request_id, e.message)
                    out.put(_error_response(req.request_id, req.view_id, e))
                    continue
                with state.lock:
                    state.futures.append(future)
                    cancelled = state.cancelled
                if cancelled:
                    future.cancel()
                future.add_done_callback(
                    lambda f, rid=req.request_id, vid=req.view_id: self._on_stream_done(f, rid, vid, out, state)
                )
        except Exception as e:  # noqa: BLE001 - the client cancelled or the connection broke
            log.debug("StreamEdit request stream ended: %s", e)
        finally:
            out.put(_EndOfInput(count))

    @staticmethod
    def _on_stream_done(
        future: concurrent.futures.Future, request_id: str, view_id: int, out: "queue.Queue[object]", state: _StreamState
    ) -> None:
        with state.lock:
            state.in_flight.discard(request_id)
            state.futures = [f for f in state.futures if f is not future]
        if future.cancelled():
            response = _error_response(request_id, view_id, RequestError(grpc.StatusCode.CANCELLED, "edit cancelled"))
        else:
            error = future.exception()
            if error is None:
                response = pb.StreamEditResponse(request_id=request_id, view_id=view_id, edited=future.result())
            elif isinstance(error, RequestError):
                response = _error_response(request_id, view_id, error)
            else:
                log.error("unexpected failure of request %r: %r", request_id, error)
                response = _error_response(request_id, view_id, RequestError(grpc.StatusCode.INTERNAL, str(error)))
        out.put(response)

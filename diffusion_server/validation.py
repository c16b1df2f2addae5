"""Request validation for the in2n.v1.EditService: what the server accepts, and turning a request into a job.

`ServiceLimits` (what the service accepts and how it schedules), `parse_request` (an EditRequest checked
field by field, its images decoded, `backend.check` asked: an `EditJob` for the worker, or a `RequestError`
carrying the gRPC status and a message naming the field), `OriginalCache` (originals a client sent with
`client_id` and `original_key`, so later requests may carry only the render; the key must be the
original's, `wire_original_key`, checked), `client_tag` (the short hash logs show of a client id, a secret)
and the tolerant deserializers (`tolerant_deserializer`: a message that does not parse becomes a
`MalformedMessage` the servicer answers with INVALID_ARGUMENT).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import grpc
import numpy as np

from diffusion_server.backends.base import EditBackend, EditRejected
from in2n_contract import (
    DEFAULT_DIFFUSION_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    MAX_CLIENT_ID_CHARS,
    MAX_GUIDANCE,
    MAX_INSTRUCTION_CHARS,
    MAX_REQUEST_ID_CHARS,
    ORIGINAL_NOT_CACHED,
    ORIGINAL_REQUIRED,
    EditParams,
    codec,
    max_message_bytes_for,
    pb,
)
from in2n_contract.codec import wire_original_key


@dataclass(frozen=True)
class ServiceLimits:
    """What the service accepts and how it schedules."""

    max_image_side: int = 2048
    max_diffusion_steps: int = 1000
    max_queued: int = 32
    max_batch: int = 1
    max_delay_s: float = 0.0
    original_cache_bytes: int = 1 << 30  # the originals cache's share of max_buffer_bytes
    max_buffer_bytes: int = 4 << 30  # everything held for clients: the cache, requests, answers not yet taken
    max_streams: int = 64
    stream_idle_timeout_s: float = 600.0  # 0: never
    max_stream_backlog: int = 32
    request_threads: int = 16  # validate and decode requests

    @property
    def max_message_bytes(self) -> int:
        return max_message_bytes_for(self.max_image_side)

    @property
    def edits_budget_bytes(self) -> int:
        """What requests and their answers may hold: the budget less the originals cache's share."""
        return self.max_buffer_bytes - self.original_cache_bytes


_ITEMSIZE = {pb.DTYPE_UINT8: 1, pb.DTYPE_FLOAT16: 2, pb.DTYPE_FLOAT32: 4}


def held_bytes(req: pb.EditRequest) -> int:
    """What the server holds for `req` until its answer is taken, from the sizes of the images as they travelled:
    the request (render and original), both decoded (float32, 4 bytes a value; a kept uint8 image costs less,
    counted the same), and the answer three times over (the backend's output, the response message, its
    serialized copy; 4 bytes a value, 1 for a uint8 render)."""
    values = len(req.render.data) // _ITEMSIZE.get(req.render.dtype, 1)  # H x W x 3 as sent
    original_values = len(req.original.data) // _ITEMSIZE.get(req.original.dtype, 1)
    answer = values * (1 if req.render.dtype == pb.DTYPE_UINT8 else 4)
    return len(req.render.data) + len(req.original.data) + 4 * (values + original_values) + 3 * answer


class RequestError(Exception):
    """A request that fails with a gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> RequestError:
    """INVALID_ARGUMENT with `message` (which names the field)."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def client_tag(client_id: str) -> str:
    """What logs and messages show of a client id: a short hash prefix. The id itself is a secret
    (whoever knows it may use that client's cached originals), so it is never written out."""
    return "#" + hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def short_repr(text: str, limit: int = 80) -> str:
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


def tolerant_deserializer(message_class: type) -> Callable[[bytes], object]:
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
    original_key: Hashable | None = None  # (client_id, view_id, key) when the original is cached
    deadline: float | None = None  # time.perf_counter() after which the edit is not worth computing
    is_active: Callable[[], bool] = _always_active  # False once the client is gone
    future: concurrent.futures.Future[pb.EditResponse] = field(default_factory=concurrent.futures.Future)


class OriginalCache:
    """Originals by (client_id, view_id), least recently used evicted beyond `max_bytes`; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[tuple[str, int], tuple[str, np.ndarray]] = collections.OrderedDict()
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

    def get(self, client_id: str, view_id: int, key: str) -> np.ndarray | None:
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
        raise invalid_argument(f"{name} must be finite and in [{low:g}, {high:g}], got {value}")
    return value


# -- one check per field (each error names its field) ----------------------------------------------------


def check_request_id(req: pb.EditRequest) -> None:
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument(
            f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(req.request_id)}"
        )


def check_client_id(req: pb.EditRequest) -> None:
    if len(req.client_id) > MAX_CLIENT_ID_CHARS:
        raise invalid_argument(f"client_id must be at most {MAX_CLIENT_ID_CHARS} characters, got {len(req.client_id)}")
    if req.original_key and not req.client_id:
        raise invalid_argument("client_id is required with original_key (originals are cached per client)")


def check_instruction(req: pb.EditRequest) -> None:
    if not req.instruction.strip():
        raise invalid_argument("instruction must be a non-empty text")
    if len(req.instruction) > MAX_INSTRUCTION_CHARS:
        raise invalid_argument(
            f"instruction must be at most {MAX_INSTRUCTION_CHARS} characters, got {len(req.instruction)}"
        )


def diffusion_steps_of(req: pb.EditRequest, limits: ServiceLimits) -> int:
    steps = req.diffusion_steps if req.HasField("diffusion_steps") else DEFAULT_DIFFUSION_STEPS
    if not 1 <= steps <= limits.max_diffusion_steps:
        raise invalid_argument(f"diffusion_steps must be in [1, {limits.max_diffusion_steps}], got {steps}")
    return int(steps)


def bounds_of(req: pb.EditRequest) -> tuple[float, float]:
    lower = _optional_float(req, "lower_bound", DEFAULT_LOWER_BOUND, 0.0, 1.0)
    upper = _optional_float(req, "upper_bound", DEFAULT_UPPER_BOUND, 0.0, 1.0)
    if lower > upper:
        raise invalid_argument(f"lower_bound ({lower:g}) must be <= upper_bound ({upper:g})")
    return lower, upper


def check_images_present(req: pb.EditRequest) -> None:
    if not req.HasField("render"):
        raise invalid_argument("render is required")
    if not req.HasField("original") and not req.original_key:
        raise invalid_argument(f"{ORIGINAL_REQUIRED} (or original_key, for an original sent before)")


def check_original_key(req: pb.EditRequest) -> None:
    """An original sent with its key must hash to it: without this check, whoever learnt a client's id could
    replace that client's cached original."""
    if req.HasField("original") and req.original_key and req.original_key != wire_original_key(req.original):
        raise invalid_argument(
            f"original_key {short_repr(req.original_key, 40)} does not match the original sent with it; "
            "send original_key(original) as computed by in2n_contract.codec (a hash of the image as it travels)"
        )


# -- the steps of parse_request ---------------------------------------------------------------------------


def check_fields(req: pb.EditRequest) -> None:
    """The checks of the request's scalar and text fields, in the order a client reads its errors."""
    check_request_id(req)
    check_client_id(req)
    check_instruction(req)


def edit_params_of(req: pb.EditRequest, limits: ServiceLimits) -> EditParams:
    """The request's edit parameters, defaults filled in, each checked."""
    guidance = _optional_float(req, "guidance_scale", DEFAULT_GUIDANCE_SCALE, 0.0, MAX_GUIDANCE)
    image_guidance = _optional_float(req, "image_guidance_scale", DEFAULT_IMAGE_GUIDANCE_SCALE, 0.0, MAX_GUIDANCE)
    steps = diffusion_steps_of(req, limits)
    lower, upper = bounds_of(req)
    return EditParams(
        instruction=req.instruction,
        guidance_scale=guidance,
        image_guidance_scale=image_guidance,
        diffusion_steps=steps,
        lower_bound=lower,
        upper_bound=upper,
        seed=req.seed if req.HasField("seed") else None,
    )


def images_of(
    req: pb.EditRequest, limits: ServiceLimits, backend: EditBackend, originals: OriginalCache | None
) -> tuple[np.ndarray, np.ndarray]:
    """(render, original) decoded, the original from `originals` when the request carries only its key.

    Raises FAILED_PRECONDITION ("original not cached ...") when the server does not hold that original."""
    check_images_present(req)
    try:
        keep = backend.accepts_uint8
        render = codec.decode_image(req.render, "render", max_side=limits.max_image_side, keep_uint8=keep)
        original = (
            codec.decode_image(req.original, "original", max_side=limits.max_image_side, keep_uint8=keep)
            if req.HasField("original")
            else None
        )
    except codec.ImageFormatError as e:
        raise invalid_argument(str(e)) from None
    check_original_key(req)
    if original is None:
        original = originals.get(req.client_id, req.view_id, req.original_key) if originals is not None else None
        if original is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{ORIGINAL_NOT_CACHED} for client {client_tag(req.client_id)}, view {req.view_id}, "
                f"key {short_repr(req.original_key, 40)}; "
                "send the request again with original set",
            )
    if render.shape != original.shape:
        raise invalid_argument(
            f"original: size {original.shape[0]}x{original.shape[1]} must match render's {render.shape[0]}x{render.shape[1]}"
        )
    return render, original


def parse_request(
    req: pb.EditRequest,
    limits: ServiceLimits,
    backend: EditBackend,
    arrival: float,
    originals: OriginalCache | None = None,
) -> EditJob:
    """Validate `req` and decode its images: its fields (`check_fields`), its parameters (`edit_params_of`),
    its images (`images_of`), then the backend's own check.

    Raises `RequestError`: INVALID_ARGUMENT naming the bad field, or FAILED_PRECONDITION
    ("original not cached ...") for a request without original whose original the server does not hold.
    A valid request with `original`, `client_id` and `original_key` puts its original in `originals`.
    """
    check_fields(req)
    params = edit_params_of(req, limits)
    render, original = images_of(req, limits, backend, originals)
    try:
        backend.check(params)
    except EditRejected as e:
        raise invalid_argument(str(e)) from None
    if req.HasField("original") and req.original_key and originals is not None:
        originals.put(req.client_id, req.view_id, req.original_key, original)
    return EditJob(
        request_id=req.request_id,
        view_id=req.view_id,
        render=render,
        original=original,
        params=params,
        uint8_out=req.render.dtype == pb.DTYPE_UINT8,
        arrival=arrival,
        original_key=(req.client_id, req.view_id, req.original_key) if req.original_key else None,
        deadline=arrival + req.timeout_ms / 1e3 if req.HasField("timeout_ms") and req.timeout_ms > 0 else None,
    )

"""Python clients of in2n.v1.EditService (no torch needed).

- `EditClient`: blocking calls for scripts and tests (Edit, Describe, health).
- `StreamClient`: the trainer's path. One bidirectional stream on a background
  thread; `submit` and `poll` never block on the network, and a broken stream
  hands every in-flight request back as UNAVAILABLE while the client reconnects
  in the background; a stream that ends with INTERNAL (its server-side half died,
  e.g. a Ray Serve replica, while the address still answers) is reopened and what
  it had no answer for is re-sent. Originals are sent once per view: later requests for the
  view carry only the render and a key of the original; when the server does
  not hold it (FAILED_PRECONDITION "original not cached"), the client re-sends
  the request with the original by itself, invisibly to the caller.

Readiness is grpc.health.v1's answer, or Describe's where health checking is
UNIMPLEMENTED (Ray Serve's gRPC proxy). Both take `token=` (sent as `authorization: Bearer <token>` metadata) and
`root_cert=` (PEM bytes or a path: TLS, checking the server's certificate
against it) or `tls=True` (TLS with the system's roots); all off by default.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typing_extensions import Self

from diffusion_server import codec
from in2n_contract import (
    DEFAULT_MAX_IMAGE_SIDE,
    ORIGINAL_NOT_CACHED,
    ORIGINAL_REQUIRED,
    SERVICE_NAME,
    STREAM_IDLE,
    EditParams,
    max_message_bytes_for,
    pb,
    pb_grpc,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = max_message_bytes_for(DEFAULT_MAX_IMAGE_SIDE)
_LARGEST_SIDE = 1 << 16  # responses are not size-limited by the client beyond the message limit
HTTP2_WINDOW_BYTES = 16 << 20
_STATUS_OF_VALUE = {code.value[0]: code for code in grpc.StatusCode}
MAX_RESENDS = 2  # a request re-sent after this many INTERNAL stream ends is handed back instead
_NOT_READY = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def status_code(value: int) -> grpc.StatusCode:
    """google.rpc.Code number -> grpc.StatusCode (UNKNOWN for numbers it does not know)."""
    return _STATUS_OF_VALUE.get(int(value), grpc.StatusCode.UNKNOWN)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_backoff_s: float = 5.0) -> list:
    """gRPC channel options: message limits for full-size images, reconnect backoff 0.1 s .. max_backoff_s."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(max_backoff_s * 1000)),
        # HTTP/2 stream window big enough for a whole image: no flow-control round trips inside one message.
        ("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES),
    ]


RootCert = Union[bytes, str, "os.PathLike[str]", None]


def make_channel(address: str, options: list, root_cert: RootCert = None, tls: bool = False) -> grpc.Channel:
    """A plaintext channel, or a TLS one when `root_cert` (PEM bytes or file) is given or `tls` is True."""
    if root_cert is None and not tls:
        return grpc.insecure_channel(address, options=options)
    if root_cert is not None and not isinstance(root_cert, bytes):
        with open(root_cert, "rb") as f:
            root_cert = f.read()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_cert), options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token` as a bearer token; None without a token."""
    return (("authorization", f"Bearer {token}"),) if token else None


def original_key(original: np.ndarray) -> str:
    """Key of an original's content as it travels (shape, dtype and pixels): the same key means the same image.

    The server computes it again from the image it receives and refuses a request whose key does not match
    (INVALID_ARGUMENT naming original_key); so float64 is keyed as the float32 it is sent as, in little-endian order.
    """
    array = np.asarray(original)
    if array.dtype == np.float64:  # sent as float32 (see _wire_image)
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())  # sha256: hardware-accelerated on most CPUs
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:32]


def _wire_image(image: np.ndarray, name: str) -> pb.Image:
    """[H, W, 3] uint8 / float16 / float32 (float64 is sent as float32) -> `Image`."""
    image = np.asarray(image)
    if image.dtype == np.float64:
        image = image.astype(np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be [H, W, 3], got shape {tuple(image.shape)}")
    try:
        return codec.encode_image(image)
    except codec.ImageFormatError as e:
        raise ValueError(f"{name}: {e}") from None


def make_request(
    request_id: str, view_id: int, render: np.ndarray, original: np.ndarray | None, params: EditParams
) -> pb.EditRequest:
    """Build an `EditRequest`; every parameter of `params` is sent explicitly (seed only when set).

    Args:
        render: [H, W, 3] uint8 in 0..255, or float16/float32 in [0, 1]; the NeRF render of the view.
        original: [H, W, 3], same height and width; the captured image of the view (None: left out,
            for a request that names a cached original by `original_key`).
    """
    request = pb.EditRequest(
        request_id=request_id,
        view_id=int(view_id),
        render=_wire_image(render, "render"),
        instruction=params.instruction,
        guidance_scale=params.guidance_scale,
        image_guidance_scale=params.image_guidance_scale,
        diffusion_steps=params.diffusion_steps,
        lower_bound=params.lower_bound,
        upper_bound=params.upper_bound,
    )
    if original is not None:
        request.original.CopyFrom(_wire_image(original, "original"))
    if params.seed is not None:
        request.seed = int(params.seed)
    return request


def _check_size(request: pb.EditRequest, max_message_bytes: int) -> None:
    size = request.ByteSize()
    if size > max_message_bytes:
        raise ValueError(
            f"the request takes {size} bytes, over the message limit of {max_message_bytes} bytes "
            f"(sized for render + original up to 2048x2048 RGB float32); send smaller images or uint8"
        )


def timings_dict(timings: pb.Timings) -> dict[str, float]:
    """`Timings` -> {"queue_ms", "compute_ms", "total_ms"}."""
    return {"queue_ms": timings.queue_ms, "compute_ms": timings.compute_ms, "total_ms": timings.total_ms}


class EditFailed(RuntimeError):
    """An edit (or another call) the server answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class EditReply:
    """A finished edit."""

    request_id: str
    view_id: int
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    timestep: int
    timings: dict[str, float]


class EditClient:
    """Blocking client: one call at a time per caller, for scripts and tests."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        token: str | None = None,
        root_cert: RootCert = None,
        tls: bool = False,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self._max_message_bytes = max_message_bytes
        self._metadata = auth_metadata(token)
        self._channel = make_channel(address, channel_options(max_message_bytes), root_cert, tls)
        self._stub = pb_grpc.EditServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def edit(
        self,
        render: np.ndarray,
        original: np.ndarray,
        params: EditParams,
        view_id: int = 0,
        request_id: str | None = None,
    ) -> EditReply:
        """Edit one view (images [H, W, 3]); raises `EditFailed` with the server's status code and message.

        The call's deadline is `timeout_s`; ValueError for a request over the message limit.
        """
        request = make_request(request_id or uuid.uuid4().hex, view_id, render, original, params)
        _check_size(request, self._max_message_bytes)
        try:
            response = self._stub.Edit(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EditFailed(e.code(), e.details() or "") from None
        return EditReply(
            request_id=response.request_id,
            view_id=response.view_id,
            image=codec.decode_image(response.edited, "edited", max_side=_LARGEST_SIDE),
            timestep=response.timestep,
            timings=timings_dict(response.timings),
        )

    def describe(self, timeout_s: float | None = None) -> pb.DescribeResponse:
        """Backend, model, device, precision and limits of the server; within timeout_s (default: the client's)."""
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self._stub.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EditFailed(e.code(), e.details() or "") from None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server's health service reports SERVING for EditService; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"diffusion server at {self.address} not SERVING after {timeout_s:g} s")
            try:
                status = self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=remaining, wait_for_ready=True
                ).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # no health service (Ray Serve's proxy): ask Describe
                    if describe_answers(self._stub, max(0.1, deadline - time.monotonic()), self._metadata):
                        return
                elif e.code() not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    raise EditFailed(e.code(), e.details() or "") from None
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # NOT_SERVING yet: ask again

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_answers(stub: pb_grpc.EditServiceStub, timeout_s: float, metadata: tuple | None) -> bool:
    """Readiness where grpc.health.v1 is UNIMPLEMENTED: True once Describe answers (a replica is up behind the proxy).

    False while it fails with UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED or NOT_FOUND (no application yet);
    True for any other answer (e.g. UNAUTHENTICATED: the server is up, the call itself will say what is wrong).
    """
    try:
        stub.Describe(pb.DescribeRequest(), timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        return e.code() not in _NOT_READY + (grpc.StatusCode.NOT_FOUND,)
    return True


@dataclass
class StreamResult:
    """The outcome of one submitted request, as returned by `StreamClient.poll`."""

    request_id: str
    view_id: int
    image: np.ndarray | None  # [H, W, 3] float32 in [0, 1]; None on failure
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    timestep: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    malformed: bool = False  # the server answered, but its image was refused when decoded (NaN, range, size)

    @property
    def ok(self) -> bool:
        return self.error_code is None


_HALF_CLOSE = object()  # ends a connection's request iterator


class _Connection:
    """One open StreamEdit call and the queue its request iterator reads."""

    def __init__(self) -> None:
        self.outgoing: queue.Queue[object] = queue.Queue()
        self.call: grpc.Call | None = None

    def requests(self) -> Iterator[pb.StreamEditRequest]:
        while True:
            item = self.outgoing.get()
            if item is _HALF_CLOSE:
                return
            yield item  # type: ignore[misc]

    def shut(self) -> None:
        """Half-close the request side and cancel the call (idempotent)."""
        self.outgoing.put(_HALF_CLOSE)
        if self.call is not None:
            self.call.cancel()


class StreamClient:
    """Non-blocking stream client for the trainer; thread-safe.

    Typical loop: `start()` once; each step, `if client.can_submit(): client.submit(...)`
    and `for result in client.poll(): ...`; `close()` at the end.
    """

    def __init__(
        self,
        address: str,
        max_in_flight: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        *,
        token: str | None = None,
        root_cert: RootCert = None,
        tls: bool = False,
        send_originals_once: bool = True,
    ):
        """
        Args:
            send_originals_once: send each view's original once (the server caches it); later requests
                carry only the render. False: every request carries its original.
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.address = address
        self.max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._metadata = auth_metadata(token)
        self._root_cert = root_cert
        self._tls = tls
        self._send_originals_once = send_originals_once
        self._server_caches = False  # learnt from Describe on each connection
        self.server_info: pb.DescribeResponse | None = None  # the server's Describe, from the latest connection
        self._client_id = uuid.uuid4().hex
        self._server_has: dict[int, str] = {}  # view id -> key of the original the server should hold
        self._resendable: dict[
            str, tuple[pb.EditRequest, np.ndarray]
        ] = {}  # sent without original: (request, original)
        self._sent: dict[str, pb.EditRequest] = {}  # request id -> the request as sent, while in flight
        self._resends: dict[str, int] = {}  # request id -> times re-sent after an INTERNAL stream end
        self._to_resend: list[pb.EditRequest] = []  # sent first on the next stream
        self.resent = 0  # requests re-sent on a new stream after their stream ended with INTERNAL
        self.originals_sent = 0  # requests that carried their original (first sends and re-sends)
        self.cache_misses = 0  # requests re-sent with their original after "original not cached"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._conn: _Connection | None = None  # set while a stream is open
        self._in_flight: dict[str, int] = {}  # request id -> view id
        self._results: list[StreamResult] = []
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self._completed = 0
        self._failed = 0

    # -- state -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a stream to the server is open."""
        return self._conn is not None

    @property
    def in_flight(self) -> int:
        """Requests submitted whose result has not arrived yet."""
        with self._lock:
            return len(self._in_flight)

    @property
    def completed(self) -> int:
        """Requests that came back with an edited image."""
        return self._completed

    @property
    def failed(self) -> int:
        """Requests that came back with an error (including UNAVAILABLE after a broken stream)."""
        return self._failed

    def can_submit(self) -> bool:
        """Connected and fewer than max_in_flight requests in flight."""
        with self._lock:
            return self._conn is not None and len(self._in_flight) < self.max_in_flight

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> StreamClient:
        """Open the channel and the stream on a background thread (retrying until the server is up)."""
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("StreamClient is closed")
            if self._thread is not None:
                raise RuntimeError("StreamClient already started")
            self._channel = make_channel(
                self.address, channel_options(self._max_message_bytes, self._max_backoff_s), self._root_cert, self._tls
            )
            self._thread = threading.Thread(target=self._run, name="in2n-stream-client", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the stream and the background thread; requests still in flight are dropped."""
        self._closed.set()
        with self._lock:
            conn, channel, thread = self._conn, self._channel, self._thread
        if conn is not None:
            conn.shut()
        if channel is not None:
            channel.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("stream client thread did not stop within %.1f s", timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests and results --------------------------------------------------------------------

    def submit(
        self, view_id: int, render: np.ndarray, original: np.ndarray, params: EditParams, key: str | None = None
    ) -> str:
        """Queue one edit and return its request id. Never blocks on the network.

        Args:
            view_id: the view; with originals sent once, the server keeps one original per view.
            render: [H, W, 3] uint8 (0..255) or float16/float32 in [0, 1].
            original: the view's captured image, same size.
            params: edit parameters.
            key: `original_key(original)` when the caller already has it (a training loop computes
                it once per view); computed here otherwise (a hash of the pixels: ~0.4 ms at 512x512).

        Raises:
            RuntimeError: not started, closed, not connected, or max_in_flight reached (see `can_submit`).
            ValueError: an image that is not [H, W, 3] uint8/float16/float32, or a request over max_message_bytes.
        """
        if self._closed.is_set():
            raise RuntimeError("StreamClient is closed")
        if self._thread is None:
            raise RuntimeError("StreamClient not started; call start() first")
        view_id = int(view_id)
        if not (self._send_originals_once and self._server_caches):
            key = ""
        elif key is None:
            key = original_key(original)
        with self._lock:
            with_original = not key or self._server_has.get(view_id) != key
        request = make_request("", view_id, render, original if with_original else None, params)
        if key:
            request.client_id = self._client_id
            request.original_key = key
        _check_size(request, self._max_message_bytes)
        kept = None if with_original else np.array(original, copy=True)  # for a re-send after a cache miss
        with self._lock:
            if self._conn is None:
                raise RuntimeError(
                    f"not connected to {self.address} (reconnecting in the background); check can_submit()"
                )
            if len(self._in_flight) >= self.max_in_flight:
                raise RuntimeError(
                    f"{self.max_in_flight} requests already in flight (max_in_flight); check can_submit()"
                )
            request.request_id = f"{self._id_prefix}-{next(self._ids)}"
            self._in_flight[request.request_id] = view_id
            self._sent[request.request_id] = request
            if kept is not None:
                self._resendable[request.request_id] = (request, kept)
            elif key:
                self._server_has[view_id] = key
            if with_original:
                self.originals_sent += 1
            self._conn.outgoing.put(pb.StreamEditRequest(edit=request))
        return request.request_id

    def poll(self) -> list[StreamResult]:
        """All results that arrived since the last call, in arrival order. Never blocks."""
        with self._lock:
            results, self._results = self._results, []
        return results

    # -- background thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._initial_backoff_s
        while not self._closed.is_set():
            try:
                attempt_start = time.monotonic()
                if not self._wait_connected(backoff):
                    self._closed.wait(max(0.0, backoff - (time.monotonic() - attempt_start)))
                    backoff = min(2 * backoff, self._max_backoff_s)
                    continue
                if self._stream():
                    backoff = self._initial_backoff_s
            except Exception as e:  # noqa: BLE001 - keep the trainer alive whatever the network does
                if self._closed.is_set():
                    break
                log.warning("stream client error: %s", e)
            if self._closed.wait(backoff):
                break
            backoff = min(2 * backoff, self._max_backoff_s)

    def _wait_connected(self, timeout_s: float) -> bool:
        """Ask the health service, waiting up to timeout_s for a connection (gRPC retries it meanwhile).

        True once the server answers and is not NOT_SERVING. A real RPC rather than a connectivity
        watch: it proves the server is up, and it leaves no watcher thread behind when the channel closes.
        """
        started = time.monotonic()
        try:
            status = (
                health_pb2_grpc.HealthStub(self._channel)
                .Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s, wait_for_ready=True)
                .status
            )
        except grpc.RpcError as e:
            if e.code() in _NOT_READY:
                return False
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # no health service (Ray Serve's proxy): ask Describe
                remaining = max(0.1, timeout_s - (time.monotonic() - started))
                return describe_answers(pb_grpc.EditServiceStub(self._channel), remaining, self._metadata)
            return True  # the server answered (e.g. UNAUTHENTICATED: the stream will report it)
        return status != health_pb2.HealthCheckResponse.NOT_SERVING

    def _stream(self) -> bool:
        """Run one StreamEdit call until it ends; then hand back everything still in flight as UNAVAILABLE.

        Returns True if the stream was healthy (a response arrived or it stayed open for a second),
        which resets the reconnect backoff.
        """
        conn = _Connection()
        stub = pb_grpc.EditServiceStub(self._channel)
        info = None
        try:  # does this server cache originals? (servers before the cache answer False)
            info = stub.Describe(pb.DescribeRequest(), timeout=10.0, metadata=self._metadata)
            caches = info.caches_originals
        except grpc.RpcError as e:
            log.debug("Describe failed (%s); sending every original", e.code())
            caches = False
        opened = time.monotonic()
        responses = 0
        conn.call = stub.StreamEdit(conn.requests(), metadata=self._metadata)
        with self._lock:
            if self._closed.is_set():
                conn.shut()
                return False
            self._server_caches = caches
            self.server_info = info if info is not None else self.server_info
            self._conn = conn
            resend, self._to_resend = self._to_resend, []
            for request in resend:  # before anything submitted on this stream
                conn.outgoing.put(pb.StreamEditRequest(edit=request))
        log.info(
            "stream client connected to %s%s", self.address, f"; re-sent {len(resend)} request(s)" if resend else ""
        )
        reason = "the server ended the stream"
        code = None
        idle_close = False  # the server closed a stream with nothing in flight: routine, not a fault
        try:
            for response in conn.call:
                responses += 1
                self._on_response(response, conn)
        except grpc.RpcError as e:
            code = e.code()
            details = " ".join((e.details() or "").split())  # one line (Ray's details span several)
            idle_close = code == grpc.StatusCode.UNAVAILABLE and details.startswith(STREAM_IDLE)
            reason = f"{code.name}: {details[:200] + '...' if len(details) > 200 else details}"
        finally:
            with self._lock:
                self._conn = None
                closing = self._closed.is_set()
                kept = self._keep_for_resend() if code == grpc.StatusCode.INTERNAL and not closing else set()
                lost = {r: v for r, v in self._in_flight.items() if r not in kept}
                self._in_flight = {r: v for r, v in self._in_flight.items() if r in kept}
                for request_id in lost:
                    self._sent.pop(request_id, None)
                    self._resends.pop(request_id, None)
                self._resendable.clear()
                if not closing:
                    message = f"stream to {self.address} broke ({reason}); resubmit when reconnected"
                    for request_id, view_id in lost.items():
                        self._results.append(
                            StreamResult(request_id, view_id, None, grpc.StatusCode.UNAVAILABLE, message)
                        )
                    self._failed += len(lost)
            conn.shut()
        if not closing:
            kept = f", {len(self._to_resend)} kept to re-send" if self._to_resend else ""
            level = logging.INFO if idle_close and not lost else logging.WARNING
            log.log(
                level,
                "stream to %s broke (%s); %d request(s) in flight handed back%s; reconnecting",
                self.address,
                reason,
                len(lost),
                kept,
            )
        return responses > 0 or time.monotonic() - opened >= 1.0

    def _keep_for_resend(self) -> set:
        """The stream ended with INTERNAL (its server side died; the address still answers): keep the requests
        in flight to send again on the next stream, with their originals (another server may not hold them).
        Called with self._lock held; returns the ids kept (they stay in flight). A request already re-sent
        MAX_RESENDS times is not kept: it is handed back, as after any other broken stream."""
        kept = set()
        for request_id, view_id in self._in_flight.items():
            request = self._sent.get(request_id)
            if request is None or self._resends.get(request_id, 0) >= MAX_RESENDS:
                continue
            entry = self._resendable.pop(request_id, None)
            if entry is not None:
                resent = pb.EditRequest()
                resent.CopyFrom(request)
                resent.original.CopyFrom(_wire_image(entry[1], "original"))
                request = self._sent[request_id] = resent
                self.originals_sent += 1
                self._server_has.pop(view_id, None)
            self._resends[request_id] = self._resends.get(request_id, 0) + 1
            self._to_resend.append(request)
            self.resent += 1
            kept.add(request_id)
        return kept

    def _resend_with_original(self, response: pb.StreamEditResponse, conn: _Connection) -> bool:
        """A request sent without its original came back "original not cached": send it again with it.

        True if re-sent (the caller sees nothing of it); only once per request.
        """
        if response.WhichOneof("outcome") != "error":
            return False
        code, message = status_code(response.error.code), response.error.message
        miss = code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith(ORIGINAL_NOT_CACHED)
        old_server = code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(ORIGINAL_REQUIRED)
        if not (miss or old_server):
            return False
        with self._lock:
            entry = self._resendable.pop(response.request_id, None)
            if entry is None or response.request_id not in self._in_flight:
                return False
            request, original = entry
            resent = pb.EditRequest()
            resent.CopyFrom(request)
            resent.original.CopyFrom(_wire_image(original, "original"))
            if old_server:  # a server that knows nothing of the cache: send every original from now on
                self._server_caches = False
            else:
                self._server_has[request.view_id] = request.original_key
            self.cache_misses += 1
            self.originals_sent += 1
            self._sent[response.request_id] = resent
            conn.outgoing.put(pb.StreamEditRequest(edit=resent))
        log.debug("request %s: %s; re-sent with its original", response.request_id, message)
        return True

    def _on_response(self, response: pb.StreamEditResponse, conn: _Connection | None = None) -> None:
        if conn is not None and self._resend_with_original(response, conn):
            return
        outcome = response.WhichOneof("outcome")
        if outcome == "edited":
            try:
                image = codec.decode_image(response.edited.edited, "edited", max_side=_LARGEST_SIDE)
                result = StreamResult(
                    response.request_id,
                    response.view_id,
                    image,
                    timestep=response.edited.timestep,
                    timings=timings_dict(response.edited.timings),
                )
            except codec.ImageFormatError as e:
                result = StreamResult(
                    response.request_id,
                    response.view_id,
                    None,
                    grpc.StatusCode.INTERNAL,
                    f"bad response: {e}",
                    malformed=True,
                )
        elif outcome == "error":
            result = StreamResult(
                response.request_id, response.view_id, None, status_code(response.error.code), response.error.message
            )
        else:
            result = StreamResult(
                response.request_id, response.view_id, None, grpc.StatusCode.INTERNAL, "response without outcome"
            )
        with self._lock:
            self._resendable.pop(response.request_id, None)
            self._sent.pop(response.request_id, None)
            self._resends.pop(response.request_id, None)
            if self._in_flight.pop(response.request_id, None) is None:
                log.debug("ignoring response to unknown request %r", response.request_id)
                return
            self._results.append(result)
            if result.ok:
                self._completed += 1
            else:
                self._failed += 1

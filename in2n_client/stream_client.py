"""`StreamClient`: the trainer's path to a server, one bidirectional stream on a background thread.

`submit` and `poll` never block on the network. A broken stream hands every in-flight request back as
UNAVAILABLE while the client reconnects in the background; a stream that ends with INTERNAL (its server-side
half died, e.g. a Ray Serve replica, while the address still answers) is reopened and what it had no answer for is
re-sent. Originals are sent once per view: later requests for the view carry only the render and the original's
key; when the server does not hold it (FAILED_PRECONDITION "original not cached"), the client re-sends the request
with the original by itself, invisibly to the caller.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typing_extensions import Self

from in2n_client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    NOT_READY,
    RootCert,
    auth_metadata,
    channel_options,
    check_size,
    describe_answers,
    make_channel,
    status_code,
)
from in2n_client.edit_client import LARGEST_SIDE, timings_dict
from in2n_contract import ORIGINAL_NOT_CACHED, ORIGINAL_REQUIRED, SERVICE_NAME, STREAM_IDLE, EditParams, pb, pb_grpc
from in2n_contract.codec import ImageFormatError, decode_image, original_key, wire_image
from in2n_contract.messages import make_request

log = logging.getLogger(__name__)

MAX_RESENDS = 2  # a request re-sent after this many INTERNAL stream ends is handed back instead


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
        self._forgotten: set[str] = set()  # request ids given up by the caller whose answer may still come
        self.late_dropped = 0  # answers that came for forgotten requests (dropped)

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
        check_size(request, self._max_message_bytes)
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

    def forget(self, request_id: str) -> bool:
        """Give up a request (the caller's timeout passed): its max_in_flight slot frees at once, and its answer, if
        one still comes on this stream, is dropped and counted in `late_dropped`. The contract has no cancel: the
        server may still do the work. Returns whether the request was in flight."""
        with self._lock:
            if self._in_flight.pop(request_id, None) is None:
                return False
            self._sent.pop(request_id, None)
            self._resendable.pop(request_id, None)
            self._resends.pop(request_id, None)
            self._to_resend = [r for r in self._to_resend if r.request_id != request_id]
            self._forgotten.add(request_id)
            return True

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
            if e.code() in NOT_READY:
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
                self._forgotten.clear()  # no answer to them can come on another stream
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
                resent.original.CopyFrom(wire_image(entry[1], "original"))
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
            resent.original.CopyFrom(wire_image(original, "original"))
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
                image = decode_image(response.edited.edited, "edited", max_side=LARGEST_SIDE)
                result = StreamResult(
                    response.request_id,
                    response.view_id,
                    image,
                    timestep=response.edited.timestep,
                    timings=timings_dict(response.edited.timings),
                )
            except ImageFormatError as e:
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
            if response.request_id in self._forgotten:
                self._forgotten.discard(response.request_id)
                self.late_dropped += 1
                return
            if self._in_flight.pop(response.request_id, None) is None:
                log.debug("ignoring response to unknown request %r", response.request_id)
                return
            self._results.append(result)
            if result.ok:
                self._completed += 1
            else:
                self._failed += 1

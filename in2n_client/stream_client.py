"""`StreamClient`: the trainer's path to a server, one bidirectional stream on a background thread.

`submit` and `poll` never block on the network. A broken stream hands every in-flight request back as
UNAVAILABLE while the client reconnects in the background; a stream that ends with INTERNAL (its server-side
half died, e.g. a Ray Serve replica, while the address still answers) is reopened and what it had no answer for is
re-sent. Originals are sent once per view to a server that caches them (its Describe says so): later requests for
the view carry only the render and the original's key; when the server does not hold it (FAILED_PRECONDITION "original not cached"), the client re-sends the request
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
from typing import Self

import grpc
import numpy as np

from in2n_client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RootCert,
    auth_metadata,
    channel_options,
    check_size,
    make_channel,
    server_ready,
    status_code,
)
from in2n_client.edit_client import LARGEST_SIDE, timings_dict
from in2n_contract import ORIGINAL_NOT_CACHED, STREAM_IDLE, EditParams, pb, pb_grpc
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


@dataclass
class _Pending:
    """One submitted request, from `submit` until its result is handed to the caller."""

    request: pb.EditRequest  # as last sent (or as it will be sent on the next stream)
    original: np.ndarray | None  # kept while the request travels without its original, to re-send it with it
    sent: bool = True  # False while it waits for the next stream, to be re-sent there
    resends: int = 0  # times re-sent after an INTERNAL stream end

    def attach_original(self) -> bool:
        """From now on the request carries its original (a new message: the one already queued is not touched).

        False when it already did."""
        if self.original is None:
            return False
        request = pb.EditRequest()
        request.CopyFrom(self.request)
        request.original.CopyFrom(wire_image(self.original, "original"))
        self.request, self.original = request, None
        return True


_HALF_CLOSE = object()  # ends a connection's request iterator


class _Connection:
    """One open StreamEdit call, the queue its request iterator reads, and whether its server caches originals."""

    def __init__(self, caches_originals: bool) -> None:
        self.outgoing: queue.Queue[object] = queue.Queue()
        self.call: grpc.Call | None = None
        self.caches_originals = caches_originals  # its Describe says so (False when Describe failed)

    def send(self, request: pb.EditRequest) -> None:
        self.outgoing.put(pb.StreamEditRequest(edit=request))

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
        self.server_info: pb.DescribeResponse | None = None  # the server's Describe, from the latest connection
        self._client_id = uuid.uuid4().hex
        self._server_has: dict[int, str] = {}  # view id -> key of the original the server should hold
        self._pending: dict[str, _Pending] = {}  # request id -> the request, while in flight (submission order)
        self.resent = 0  # requests re-sent on a new stream after their stream ended with INTERNAL
        self.originals_sent = 0  # requests that carried their original (first sends and re-sends)
        self.cache_misses = 0  # requests re-sent with their original after "original not cached"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._conn: _Connection | None = None  # set while a stream is open
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
            return len(self._pending)

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
            return self._conn is not None and len(self._pending) < self.max_in_flight

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
        with self._lock:
            caches = self._conn is not None and self._conn.caches_originals
        if not (self._send_originals_once and caches):
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
            if len(self._pending) >= self.max_in_flight:
                raise RuntimeError(
                    f"{self.max_in_flight} requests already in flight (max_in_flight); check can_submit()"
                )
            request.request_id = f"{self._id_prefix}-{next(self._ids)}"
            self._pending[request.request_id] = _Pending(request, kept)
            if with_original:
                self.originals_sent += 1
                if key:  # the server holds it from this request on
                    self._server_has[view_id] = key
            self._conn.send(request)
        return request.request_id

    def forget(self, request_id: str) -> bool:
        """Give up a request (the caller's timeout passed): its max_in_flight slot frees at once, and its answer, if
        one still comes on this stream, is dropped and counted in `late_dropped`. The contract has no cancel: the
        server may still do the work. Returns whether the request was in flight."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return False
            if pending.sent:  # an answer may still come on this stream; one never sent has none to come
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
                if not server_ready(self._channel, backoff, self._metadata):
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

    def _stream(self) -> bool:
        """Run one StreamEdit call until it ends; then hand back everything still in flight as UNAVAILABLE.

        Returns True if the stream was healthy (a response arrived or it stayed open for a second),
        which resets the reconnect backoff.
        """
        stub = pb_grpc.EditServiceStub(self._channel)
        info = None
        try:
            info = stub.Describe(pb.DescribeRequest(), timeout=10.0, metadata=self._metadata)
        except grpc.RpcError as e:
            log.debug("Describe failed (%s); sending every original", e.code())
        conn = _Connection(caches_originals=info is not None and info.caches_originals)
        opened = time.monotonic()
        responses = 0
        conn.call = stub.StreamEdit(conn.requests(), metadata=self._metadata)
        with self._lock:
            if self._closed.is_set():
                conn.shut()
                return False
            self.server_info = info if info is not None else self.server_info
            self._conn = conn
            resend = [p for p in self._pending.values() if not p.sent]
            for pending in resend:  # before anything submitted on this stream
                pending.sent = True
                conn.send(pending.request)
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
                kept = self._keep_for_resend() if code == grpc.StatusCode.INTERNAL and not closing else 0
                lost = {r: p for r, p in self._pending.items() if p.sent}
                for request_id in lost:
                    del self._pending[request_id]
                self._forgotten.clear()  # no answer to them can come on another stream
                if not closing:
                    message = f"stream to {self.address} broke ({reason}); resubmit when reconnected"
                    for request_id, pending in lost.items():
                        self._results.append(
                            StreamResult(
                                request_id, pending.request.view_id, None, grpc.StatusCode.UNAVAILABLE, message
                            )
                        )
                    self._failed += len(lost)
            conn.shut()
        if not closing:
            level = logging.INFO if idle_close and not lost else logging.WARNING
            log.log(
                level,
                "stream to %s broke (%s); %d request(s) in flight handed back%s; reconnecting",
                self.address,
                reason,
                len(lost),
                f", {kept} kept to re-send" if kept else "",
            )
        return responses > 0 or time.monotonic() - opened >= 1.0

    def _keep_for_resend(self) -> int:
        """The stream ended with INTERNAL (its server side died; the address still answers): keep the requests
        in flight to send again on the next stream, with their originals (another server may not hold them).
        Called with self._lock held; returns how many it kept (they stay in flight). A request already re-sent
        MAX_RESENDS times is not kept: it is handed back, as after any other broken stream."""
        kept = 0
        for pending in self._pending.values():
            if pending.resends >= MAX_RESENDS:
                continue
            if self._resend_with_original(pending):
                self._server_has.pop(pending.request.view_id, None)
            pending.resends += 1
            pending.sent = False
            self.resent += 1
            kept += 1
        return kept

    def _resend_with_original(self, pending: _Pending, conn: _Connection | None = None) -> bool:
        """Attach the original to a request sent without it, and send it on `conn` (None: on the next stream).

        False when the request already carried its original. Called with self._lock held."""
        if not pending.attach_original():
            return False
        self.originals_sent += 1
        if conn is not None:
            conn.send(pending.request)
        return True

    def _on_cache_miss(self, response: pb.StreamEditResponse, conn: _Connection) -> bool:
        """A request sent without its original came back "original not cached": send it again with it.

        True if re-sent (the caller sees nothing of it); only once per request.
        """
        if response.WhichOneof("outcome") != "error":
            return False
        code, message = status_code(response.error.code), response.error.message
        if not (code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith(ORIGINAL_NOT_CACHED)):
            return False
        with self._lock:
            pending = self._pending.get(response.request_id)
            if pending is None or not self._resend_with_original(pending, conn):
                return False
            self._server_has[pending.request.view_id] = pending.request.original_key
            self.cache_misses += 1
        log.debug("request %s: %s; re-sent with its original", response.request_id, message)
        return True

    def _on_response(self, response: pb.StreamEditResponse, conn: _Connection | None = None) -> None:
        if conn is not None and self._on_cache_miss(response, conn):
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
            if response.request_id in self._forgotten:
                self._forgotten.discard(response.request_id)
                self.late_dropped += 1
                return
            if self._pending.pop(response.request_id, None) is None:
                log.debug("ignoring response to unknown request %r", response.request_id)
                return
            self._results.append(result)
            if result.ok:
                self._completed += 1
            else:
                self._failed += 1

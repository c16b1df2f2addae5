"""The in2n.v1.EditService servicer (asyncio: it runs on a `grpc.aio` server's event loop).

`EditServicer` serves Describe, Edit and StreamEdit over one backend; `add_edit_service` registers it on
a server with tolerant request deserializers. Requests are validated on a small thread pool
(`validation.parse_request`: images decoded, numbers range-checked, originals' keys checked,
`backend.check` asked), then handed to the batching `worker.EditWorker`, the one thread that owns the
backend. Edit and StreamEdit submit through one path (`EditServicer._submit`: parse, merge the call's
deadline, queue). RPCs await the edits' futures: a waiting call holds no thread, so open streams cannot
starve health checks or unary calls.

Streams are bounded three ways: at most `max_streams` are open (a new one beyond gets
RESOURCE_EXHAUSTED at once); one idle longer than `stream_idle_timeout_s` (no request read
and nothing of its own unanswered) is closed with UNAVAILABLE, and so is one whose client
reads nothing for that long (a response could not be handed to gRPC for `stream_idle_timeout_s`:
the client's receive window stays full); and a stream's backlog (requests read whose response
is not yet handed to gRPC: edits in flight plus answers the client has not taken) is at most
`max_stream_backlog`: at the bound the server stops reading that stream's requests until the
client reads (back-pressure, rather than refusing: a slow reader loses nothing, and its
requests wait in its own send window; one that stops reading altogether loses its stream after
the timeout, so it cannot hold a slot of `max_streams` until its deadline). Everything a stream
holds is dropped when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

import diffusion_server
from diffusion_server.backends.base import EditBackend
from diffusion_server.memory import MemoryBudget, MiB
from diffusion_server.metrics import Metrics
from diffusion_server.validation import (
    EditJob,
    MalformedMessage,
    OriginalCache,
    RequestError,
    ServiceLimits,
    held_bytes,
    invalid_argument,
    parse_request,
    short_repr,
    tolerant_deserializer,
)
from diffusion_server.worker import EditWorker
from in2n_contract import SERVICE_NAME, STREAM_IDLE, pb, pb_grpc

log = logging.getLogger(__name__)


def add_edit_service(servicer: EditServicer, server: grpc.Server) -> None:
    """Register `servicer` on `server` as in2n.v1.EditService (what the generated
    `add_EditServiceServicer_to_server` does, with tolerant request deserializers: see `MalformedMessage`)."""
    handlers = {
        "StreamEdit": grpc.stream_stream_rpc_method_handler(
            servicer.StreamEdit,
            request_deserializer=tolerant_deserializer(pb.StreamEditRequest),
            response_serializer=pb.StreamEditResponse.SerializeToString,
        ),
        "Edit": grpc.unary_unary_rpc_method_handler(
            servicer.Edit,
            request_deserializer=tolerant_deserializer(pb.EditRequest),
            response_serializer=pb.EditResponse.SerializeToString,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=tolerant_deserializer(pb.DescribeRequest),
            response_serializer=pb.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _deadline_from(context: grpc.ServicerContext, arrival: float) -> float | None:
    """The call's deadline as a time.perf_counter() value, None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return arrival + max(0.0, remaining)


class _Stream:
    """Book-keeping of one StreamEdit call. Lives on the server's event loop: other threads touch it only
    through `post` (and read `closed`, `unanswered`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_backlog: int):
        self.loop = loop
        self.out: asyncio.Queue[object] = asyncio.Queue()  # responses and markers for the writer
        self.in_flight: set[str] = set()  # request ids of accepted edits not answered yet
        self.futures: set[concurrent.futures.Future] = set()
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


@dataclass
class _Closing:
    """Why the server ends a stream: idle (no request, nothing in flight), or its client takes no response."""

    idle: bool
    dropped: int = 0  # responses the client will not get (not reading: those queued behind the one pending, in flight)
    pending_write: _Write | None = None  # the response gRPC holds until the client reads (not reading)
    held: int = 0  # the budget its edit holds until then


_Write = asyncio.Future  # a `context.write` running as a task


def _raise_if_failed(write: _Write) -> None:
    """A finished write that failed (the client cancelled, the connection broke) ends the call quietly."""
    error = write.exception()  # raises CancelledError for a cancelled write
    if error is not None:
        log.debug("StreamEdit write failed: %s", error)
        raise asyncio.CancelledError() from error


async def _finished(write: _Write) -> None:
    """Wait until `write` is done (the client read on, or went: then CancelledError); cancelled with the call."""
    try:
        await asyncio.wait((write,))
    except asyncio.CancelledError:
        write.cancel()
        raise
    _raise_if_failed(write)


def _check_stream_request(stream_request: pb.StreamEditRequest | MalformedMessage, stream: _Stream) -> None:
    """What StreamEdit asks of a request beyond `parse_request`'s checks: one check per field, naming it."""
    if isinstance(stream_request, MalformedMessage):
        raise invalid_argument(stream_request.message())
    if not stream_request.HasField("edit"):
        raise invalid_argument("edit is required in every StreamEditRequest")
    request_id = stream_request.edit.request_id
    if not request_id:
        raise invalid_argument("request_id must be non-empty in StreamEdit (responses are matched by it)")
    if request_id in stream.in_flight:
        raise invalid_argument(f"request_id {short_repr(request_id)} is already in flight on this stream")


@dataclass
class _Answer:
    """A response for the stream's writer, and the bytes of the budget its edit holds until it is sent."""

    response: pb.StreamEditResponse
    held: int = 0


_DRAINED = object()  # the server is stopping and every accepted edit has been answered: end the stream


def _error_response(request_id: str, view_id: int, error: RequestError) -> pb.StreamEditResponse:
    return pb.StreamEditResponse(
        request_id=request_id,
        view_id=view_id,
        error=pb.EditError(code=error.code.value[0], message=error.message),
    )


def _request_error(error: BaseException, request_id: str) -> RequestError:
    """What the client is told of an edit's failure: a RequestError as it is; anything else (a bug) is logged
    and becomes INTERNAL."""
    if isinstance(error, RequestError):
        return error
    log.error("unexpected failure of request %s: %r", short_repr(request_id), error)
    return RequestError(grpc.StatusCode.INTERNAL, str(error))


def _ended_code(job: EditJob) -> grpc.StatusCode:
    """The status of an edit whose call ended before its answer: its deadline passed, or the client cancelled."""
    expired = job.deadline is not None and time.perf_counter() >= job.deadline
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


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
        limits: ServiceLimits = ServiceLimits(),  # noqa: B008 - frozen: one shared default is safe
        metrics: Metrics | None = None,
    ):
        self._backend = backend
        self._backend_name = backend.name or type(backend).__name__  # what Describe reports
        self._limits = limits
        self._info = backend.info()
        self._metrics = metrics if metrics is not None else Metrics()
        self._worker = EditWorker(backend, limits.max_queued, limits.max_batch, limits.max_delay_s, metrics)
        self._originals = OriginalCache(limits.original_cache_bytes) if limits.original_cache_bytes > 0 else None
        self._budget = MemoryBudget(limits.edits_budget_bytes)
        self._requests = concurrent.futures.ThreadPoolExecutor(limits.request_threads, thread_name_prefix="request")
        self._streams_lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._refusals = 0  # streams refused since the last log line about it (on the loop)
        self._refusal_logged = -math.inf  # time.monotonic() of that line

    @property
    def worker(self) -> EditWorker:
        return self._worker

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget of edits (read on the server's loop; tests read `used` with a deadline)."""
        return self._budget

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
        self._metrics.request_done(method, code.name)

    async def _parse(self, req: pb.EditRequest, arrival: float) -> EditJob:
        """`parse_request` on the request threads (decoding and hashing images would stall the loop)."""
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(
                self._requests, parse_request, req, self._limits, self._backend, arrival, self._originals
            )
        except RuntimeError:  # the pool is shut down: close() was called
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another server or later"
            ) from None
        return await pending

    async def _submit(
        self, req: pb.EditRequest, arrival: float, context: grpc.aio.ServicerContext, is_active: Callable[[], bool]
    ) -> EditJob:
        """The one path of Edit and StreamEdit: parse `req`, bound its deadline by the call's, mark it
        active while `is_active()`, queue it on the worker (its answer comes on `job.future`).
        Raises RequestError (the request's fault, a full queue, a server shutting down)."""
        job = await self._parse(req, arrival)
        call_deadline = _deadline_from(context, arrival)
        if call_deadline is not None:
            job.deadline = call_deadline if job.deadline is None else min(job.deadline, call_deadline)
        job.is_active = is_active
        self._worker.submit(job)
        return job

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
            defaults=pb.EditDefaults(**self._info.edit_defaults()),  # the backend's, for parameters a user left unset
            ignored_fields=list(self._info.ignored_fields),
        )

    # -- Edit (unary) ----------------------------------------------------------------------------

    async def Edit(self, request: pb.EditRequest, context: grpc.aio.ServicerContext) -> pb.EditResponse:
        """Two steps: admission (`_accept_edit`: parsed and queued, or refused), then the edit's outcome."""
        gone = threading.Event()  # the call ended (answered, cancelled, deadline): read by the worker thread
        job = await self._accept_edit(request, context, lambda: not gone.is_set())
        held = held_bytes(request)  # reserved by _accept_edit, held until the answer is sent
        context.add_done_callback(lambda _context: self._budget.release(held))

        # gRPC's RPC state (and its callbacks) may outlive the call: this callback holds the job only until it runs.
        pending = [job.future]

        def ended(_context: object) -> None:  # client gone: drop the job if it has not started
            gone.set()
            if pending:
                pending.pop().cancel()

        context.add_done_callback(ended)
        try:
            await _wait(job.future)
        except asyncio.CancelledError:  # the call ended first: the client cancelled, or its deadline passed
            self._count("Edit", _ended_code(job))
            raise
        if job.future.cancelled():
            code = _ended_code(job)
            expired = code == grpc.StatusCode.DEADLINE_EXCEEDED
            await self._refuse_edit(context, code, "deadline passed; not computed" if expired else "edit cancelled")
        error = job.future.exception()
        if error is not None:
            error = _request_error(error, request.request_id)
            await self._refuse_edit(context, error.code, error.message)
        self._count("Edit", grpc.StatusCode.OK)
        return job.future.result()

    async def _accept_edit(
        self,
        request: pb.EditRequest | MalformedMessage,
        context: grpc.aio.ServicerContext,
        is_active: Callable[[], bool],
    ) -> EditJob:
        """The unary request parsed and queued; a refused one ends the call with its status (logged and counted)."""
        arrival = time.perf_counter()
        if isinstance(request, MalformedMessage):
            log.info("Edit rejected: %s", request.message(), extra={"event": "rejected", "code": "INVALID_ARGUMENT"})
            await self._refuse_edit(context, grpc.StatusCode.INVALID_ARGUMENT, request.message())
        held = held_bytes(request)
        try:
            if not self._budget.fits_at_all(held):
                raise self._too_large(held)
            if not self._budget.try_reserve(held):
                raise self._budget_full(held)
            try:
                return await self._submit(request, arrival, context, is_active)
            except BaseException:
                self._budget.release(held)
                raise
        except RequestError as e:
            log.info(
                "Edit %s rejected: %s",
                short_repr(request.request_id),
                e.message,
                extra={"event": "rejected", "request_id": request.request_id, "code": e.code.name},
            )
            await self._refuse_edit(context, e.code, e.message)
        raise AssertionError("context.abort returned")  # it raises

    def _hold_for_stream(self, req: pb.EditRequest) -> int:
        """The bytes a stream's request holds; a request larger than the whole budget is refused."""
        held = held_bytes(req)
        if not self._budget.fits_at_all(held):
            raise self._too_large(held)
        return held

    async def _reserve_for_stream(self, held: int) -> None:
        """Hold `held` bytes of the budget, waiting until they fit: back-pressure, nothing more is read from the
        stream meanwhile (counted as a paused stream)."""
        if self._budget.try_reserve(held):
            return
        self._metrics.stream_paused()
        try:
            await self._budget.reserve(held)
        finally:
            self._metrics.stream_resumed()

    def _too_large(self, held: int) -> RequestError:
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request too large for the server's memory budget: it holds {held / MiB:.0f} MiB (images and answer), "
            f"more than the {self._budget.capacity / MiB:.0f} MiB the server may hold for edits (--max-buffer-mb "
            "less --original-cache-mb); send smaller images",
        )

    def _budget_full(self, held: int) -> RequestError:
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server memory budget is full: {self._budget.used / MiB:.0f} of {self._budget.capacity / MiB:.0f} MiB "
            f"held for edits, this request needs {held / MiB:.0f} MiB more (--max-buffer-mb); retry later",
        )

    async def _refuse_edit(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        """End a unary Edit with `code` (counted)."""
        self._count("Edit", code)
        await context.abort(code, message)

    # -- StreamEdit ------------------------------------------------------------------------------

    async def StreamEdit(
        self, request_iterator: AsyncIterator[pb.StreamEditRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Coroutine handler (writes with `context.write`): a write that fails because the client went away
        ends the call quietly, where a generator handler would have grpc log a traceback.

        Three steps: admission (a slot of --max-streams, or RESOURCE_EXHAUSTED), reading (a task: each request
        checked and submitted, `_read_stream`) and writing (this coroutine: each response handed to gRPC,
        `_write_responses`); a stream the server ends (idle, or its client not reading) gets UNAVAILABLE."""
        stream = await self._admit(context)
        reader = asyncio.create_task(self._read_stream(request_iterator, stream, context))
        try:
            closing = await self._write_responses(stream, context)
        finally:
            self._end_stream(stream, reader)
        if closing is not None:
            await self._close_stream(closing, context)

    async def _admit(self, context: grpc.aio.ServicerContext) -> _Stream:
        """A new stream, holding a slot of --max-streams; aborts with RESOURCE_EXHAUSTED when none is free."""
        limits = self._limits
        stream = _Stream(asyncio.get_running_loop(), limits.max_stream_backlog)
        with self._streams_lock:
            admitted = len(self._streams) < limits.max_streams
            if admitted:
                self._streams.add(stream)
            open_now = len(self._streams)
        if admitted:
            self._metrics.streams_open_now(open_now)
            return stream
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 10.0:  # one line per 10 s at most: a flood of streams must not flood the log
            log.info(
                "StreamEdit refused: %d streams open (--max-streams); %d refused since the last such line",
                limits.max_streams,
                self._refusals,
                extra={"event": "stream_refused", "code": "RESOURCE_EXHAUSTED"},
            )
            self._refusal_logged, self._refusals = now, 0
        self._metrics.stream_refused()
        self._count("StreamEdit", grpc.StatusCode.RESOURCE_EXHAUSTED)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many open streams: the server's limit of {limits.max_streams} open StreamEdit streams "
            "(--max-streams) is reached; close a stream or retry later",
        )
        raise AssertionError("context.abort returned")  # it raises

    async def _write_responses(self, stream: _Stream, context: grpc.aio.ServicerContext) -> _Closing | None:
        """Hand the stream's responses to gRPC as they come until every request read has its answer (None), the
        server drains (None), or the server ends the stream (a `_Closing`: idle, or its client not reading)."""
        idle_s = self._limits.stream_idle_timeout_s
        expected: int | None = None  # requests read, once the client has ended its request stream
        sent = 0
        while expected is None or sent < expected:
            timeout = None
            if idle_s > 0 and stream.backlog == 0:  # nothing of its own in flight: the idle clock runs
                timeout = max(0.0, stream.last_activity + idle_s - stream.loop.time())
            item = await self._next(stream, timeout)
            if item is None:  # no item within the timeout
                if stream.backlog == 0 and stream.loop.time() - stream.last_activity >= idle_s:
                    return _Closing(idle=True)
                continue
            if item is _DRAINED:
                return None
            if isinstance(item, _EndOfInput):
                expected = item.count
                continue
            assert isinstance(item, _Answer)
            try:
                write = await self._write(context, item.response, idle_s)
            except BaseException:  # the client went away: the answer is dropped
                self._budget.release(item.held)
                raise
            if not write.done():  # it goes once the client reads; those behind it and the edits in flight do not
                return _Closing(idle=False, dropped=stream.backlog - 1, pending_write=write, held=item.held)
            self._budget.release(item.held)
            sent += 1
            stream.sent()
        return None

    async def _close_stream(self, closing: _Closing, context: grpc.aio.ServicerContext) -> None:
        """End a stream the server closes with UNAVAILABLE, saying why (logged and counted)."""
        idle_s = self._limits.stream_idle_timeout_s
        if closing.idle:
            log.info(
                "StreamEdit closed after %.0f s idle (--stream-idle-timeout-s)", idle_s, extra={"event": "stream_idle"}
            )
            self._metrics.stream_idle_closed()
            message = (
                f"{STREAM_IDLE} {idle_s:g} s (no request and nothing in flight; the server's --stream-idle-timeout-s): "
                "closed by the server; open a new stream to send more edits"
            )
        else:
            log.info(
                "StreamEdit closed: its client read no response for %.0f s (--stream-idle-timeout-s); "
                "%d response(s) dropped",
                idle_s,
                closing.dropped,
                extra={"event": "stream_not_reading"},
            )
            self._metrics.stream_unread_closed()
            message = (
                f"stream closed by the server: the client is not reading its responses (none taken for {idle_s:g} s, "
                f"the server's --stream-idle-timeout-s); {closing.dropped} response(s) dropped; "
                "read responses as they come"
            )
        if closing.pending_write is not None:  # the status follows the response gRPC still holds
            try:
                await _finished(closing.pending_write)
            finally:
                self._budget.release(closing.held)
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    @staticmethod
    async def _write(context: grpc.aio.ServicerContext, response: pb.StreamEditResponse, timeout_s: float) -> _Write:
        """Hand `response` to gRPC: the write, done, or still pending after `timeout_s` seconds (0: wait as long as
        it takes) because the client's receive window stays full: the client does not read its responses.

        A pending write is never cancelled: gRPC holds it until the client reads or goes, and no status can be
        sent before it completes (`context.abort` under it fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
        A write that fails because the client cancelled or the connection broke ends the call quietly
        (CancelledError)."""
        write: _Write = asyncio.ensure_future(context.write(response))
        try:
            await asyncio.wait((write,), timeout=timeout_s if timeout_s > 0 else None)
        except asyncio.CancelledError:
            write.cancel()
            raise
        if write.done():
            _raise_if_failed(write)
        return write

    @staticmethod
    async def _next(stream: _Stream, timeout: float | None) -> object | None:
        """The next item of `stream.out`; None if none came within `timeout` seconds (None: wait as long as it takes).

        Not `asyncio.wait_for`: on Python 3.11 it loses a cancellation that arrives as the item does (the
        client cancelling just as its request stream ends), and the stream would then wait forever.
        """
        if timeout is None:
            return await stream.out.get()
        getter = asyncio.ensure_future(stream.out.get())
        try:
            await asyncio.wait((getter,), timeout=timeout)
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():  # taken as the call ended: back, for _end_stream to drop
                stream.out.put_nowait(getter.result())
            getter.cancel()
            raise
        if not getter.done():
            getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    def _end_stream(self, stream: _Stream, reader: asyncio.Task[None]) -> None:
        """The call is over: forget the stream, stop its reader, cancel its edits, drop its queued responses."""
        stream.closed = True
        reader.cancel()
        with self._streams_lock:
            self._streams.discard(stream)
            open_now = len(self._streams)
        self._metrics.streams_open_now(open_now)
        futures, stream.futures = list(stream.futures), set()
        for future in futures:
            future.cancel()
        while not stream.out.empty():
            item = stream.out.get_nowait()
            if isinstance(item, _Answer):
                self._budget.release(item.held)

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
                await self._take(stream_request, stream, context)
                if not stream.room.is_set():  # back-pressure: read on once the client has taken a response
                    await self._paused(stream)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the client cancelled or the connection broke
            log.debug("StreamEdit request stream ended: %s", e)
        finally:
            if not stream.closed:
                stream.out.put_nowait(_EndOfInput(count))

    async def _take(
        self,
        stream_request: pb.StreamEditRequest | MalformedMessage,
        stream: _Stream,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Check one request read from `stream` and submit it; a refused one is answered at once with an EditError."""
        arrival = time.perf_counter()
        req = pb.EditRequest() if isinstance(stream_request, MalformedMessage) else stream_request.edit
        held = 0
        try:
            _check_stream_request(stream_request, stream)
            held = self._hold_for_stream(req)
            await self._reserve_for_stream(held)
            stream.in_flight.add(req.request_id)
            try:
                future = (await self._submit(req, arrival, context, lambda: not stream.closed)).future
            except BaseException:
                stream.in_flight.discard(req.request_id)
                self._budget.release(held)
                raise
        except RequestError as e:
            log.info(
                "StreamEdit request %s rejected: %s",
                short_repr(req.request_id),
                e.message,
                extra={"event": "rejected", "request_id": req.request_id, "code": e.code.name},
            )
            self._count("StreamEdit", e.code)
            stream.out.put_nowait(_Answer(_error_response(req.request_id, req.view_id, e)))
            return
        stream.futures.add(future)
        stream.unanswered += 1
        future.add_done_callback(
            lambda f, rid=req.request_id, vid=req.view_id: self._on_stream_done(f, rid, vid, stream, held)
        )

    async def _paused(self, stream: _Stream) -> None:
        """Wait (reading nothing) until `stream`'s backlog is below its bound."""
        self._metrics.stream_paused()
        try:
            await stream.room.wait()
        finally:
            self._metrics.stream_resumed()

    def _on_stream_done(
        self, future: concurrent.futures.Future, request_id: str, view_id: int, stream: _Stream, held: int
    ) -> None:
        """An accepted edit of `stream` finished (on the thread that finished it): count it, queue its response on the loop."""
        if future.cancelled():
            error: BaseException | None = RequestError(grpc.StatusCode.CANCELLED, "edit cancelled")
        else:
            error = future.exception()
        if error is None:
            response = pb.StreamEditResponse(request_id=request_id, view_id=view_id, edited=future.result())
            self._count("StreamEdit", grpc.StatusCode.OK)
        else:
            error = _request_error(error, request_id)
            response = _error_response(request_id, view_id, error)
            self._count("StreamEdit", error.code)
        stream.post(self._queue_response, future, request_id, _Answer(response, held), stream)

    def _queue_response(
        self, future: concurrent.futures.Future, request_id: str, answer: _Answer, stream: _Stream
    ) -> None:
        """On the loop: hand an edit's response to the stream's writer (dropped if the stream has ended)."""
        stream.in_flight.discard(request_id)
        stream.futures.discard(future)
        stream.unanswered -= 1
        if stream.closed:
            self._budget.release(answer.held)
        else:
            stream.out.put_nowait(answer)

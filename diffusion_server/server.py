"""Build and run the gRPC server: EditService, health checking and reflection.

The server is a `grpc.aio` server on an event loop of its own thread (`AioServer`, driven from
synchronous code: `start()`, `stop(grace).wait()`). Why asyncio: a stream that waits for its client
holds no thread, only a coroutine, so no number of open streams can starve health checks, Describe or
Edit (with a thread pool, each open stream held a thread: 16 idle streams froze the server).
Streams are still bounded (`--max-streams`, `--stream-idle-timeout-s`): see service.py.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffusion_server.auth import UNAUTHENTICATED_MESSAGE, BearerToken
from diffusion_server.backends import BackendUnavailable, create_backend
from diffusion_server.backends.base import EditBackend
from diffusion_server.config import ServerConfig
from diffusion_server.memory import trim_periodically
from diffusion_server.metrics import Metrics, ServerMetrics
from diffusion_server.service import EditServicer, add_edit_service
from diffusion_server.validation import ServiceLimits
from in2n_contract import HTTP2_WINDOW_BYTES, SERVICE_NAME

log = logging.getLogger(__name__)

T = TypeVar("T")


HEALTH_PREFIX = "/grpc.health.v1.Health/"
TRIM_EVERY_S = 5.0
"""How often the allocator's free pages go back to the system (see memory.trim_allocator)."""


class StartupError(RuntimeError):
    """The server cannot start; the message is one line saying what to do."""


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to every call without metadata `authorization: Bearer <token>`, except health checks."""

    def __init__(self, token: str, metrics: Metrics):
        self._token = BearerToken(token)
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX) or self._token.accepts(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        self._metrics.request_done(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")

        async def deny(request_or_iterator, context):  # type: ignore[no-untyped-def]
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


_STANDARD_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():  # fields given with `extra=`: request_id, code, ...
            if key not in _STANDARD_RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Root logger on stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def resolve_token(config: ServerConfig) -> str | None:
    """--token, else $IN2N_TOKEN, else None (no token required)."""
    if config.token is not None:
        return config.token
    return os.environ.get("IN2N_TOKEN") or None


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"{flag} {path}: cannot read it ({e.strerror or e}); give a readable PEM file") from e
    if b"-----BEGIN" not in data:
        raise StartupError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


class AioServer:
    """A `grpc.aio.Server` running on an event loop in a daemon thread of its own, driven from synchronous
    code the way a `grpc.server()` is: `start()`, `stop(grace).wait()`, `wait_for_termination()`.

    `call(coroutine)` runs a coroutine on the server's loop and returns its result.
    """

    def __init__(self, **server_kwargs: Any):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-aio", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()
        self._stopping = False

        async def create() -> grpc.aio.Server:
            return grpc.aio.server(**server_kwargs)

        self.server: grpc.aio.Server = self.call(create())

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
        """Run `awaitable` on the server's loop; wait for and return its result."""

        async def run() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self.server.add_secure_port(address, credentials)

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (RPCs still running get `grace` seconds, None: none), then end the loop.
        Returns an event set once everything has stopped, as `grpc.Server.stop` does."""
        if self._stopping:
            return self._stopped
        self._stopping = True

        async def stop_all() -> None:
            await self.server.stop(grace)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        def finish(_future: object) -> None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self._stopped.set()

        try:
            future = asyncio.run_coroutine_threadsafe(stop_all(), self.loop)
        except RuntimeError:  # the loop is gone already
            self._stopped.set()
            return self._stopped
        future.add_done_callback(lambda f: threading.Thread(target=finish, args=(f,), daemon=True).start())
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True once stopped; False if `timeout` passed first."""
        return self._stopped.wait(timeout)


def backend_of(config: ServerConfig) -> EditBackend:
    """The backend `config` names, built with its options (the standalone server and each Ray replica).

    Raises:
        BackendUnavailable: the backend cannot be built here (missing weights or package, no such device).
    """
    return create_backend(
        config.backend, config.model, config.device, config.precision, config.seed,
        channels_last=config.channels_last, compile=config.compile, cpu_offload=config.cpu_offload,
        delay_ms=config.delay_ms,
    )  # fmt: skip


def resolve_max_batch(config: ServerConfig, backend: EditBackend) -> int:
    """--max-batch, or the backend's default_max_batch when not given."""
    return config.max_batch if config.max_batch is not None else int(getattr(backend, "default_max_batch", 1))


def service_limits(config: ServerConfig, backend: EditBackend) -> ServiceLimits:
    """The limits `config` sets on the service of `backend` (the standalone server and each Ray replica)."""
    return ServiceLimits(
        max_image_side=config.max_image_side,
        max_diffusion_steps=config.max_diffusion_steps,
        max_queued=config.max_queued,
        max_batch=resolve_max_batch(config, backend),
        max_delay_s=config.max_delay_ms / 1e3,
        original_cache_bytes=config.cache_mb << 20,
        max_buffer_bytes=config.budget_mb << 20,
        max_streams=config.max_streams,
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        max_stream_backlog=config.max_stream_backlog,
        request_threads=config.rpc_threads,
    )


KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC options that close connections nobody uses: idle ones (no call open for
    --connection-idle-timeout-s, raw TCP connections that never open one included), and, through keepalive
    pings (every 60 s, 20 s to answer), those whose peer is gone while a call is open."""
    options = [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS)]
    if config.connection_idle_timeout_s > 0:
        options.append(("grpc.max_connection_idle_ms", max(1, round(config.connection_idle_timeout_s * 1e3))))
    return options


def build_server(
    config: ServerConfig, backend: EditBackend, metrics: Metrics | None = None
) -> tuple[AioServer, int, EditServicer, health.aio.HealthServicer]:
    """Create (not start) a server for `backend` bound to config.host:config.port.

    TLS when config.tls_cert/tls_key are set; a bearer token when `resolve_token(config)` gives one.
    Returns (server, actual port, servicer, health servicer).
    """
    limits = service_limits(config, backend)
    metrics = metrics if metrics is not None else Metrics()
    token = resolve_token(config)
    interceptors = [] if token is None else [TokenAuthInterceptor(token, metrics)]
    credentials = None
    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = _read_pem("--tls-cert", config.tls_cert), _read_pem("--tls-key", config.tls_key)
        try:
            credentials = grpc.ssl_server_credentials([(key, cert)])
        except Exception as e:
            raise StartupError(f"--tls-cert/--tls-key: cannot use them ({e})") from e
    server = AioServer(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES),
            ("grpc.http2.bdp_probe", 0),
            *connection_options(config),
        ],
    )
    servicer = EditServicer(backend, limits, metrics)
    add_edit_service(servicer, server.server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server.server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server.server,
    )

    address = f"{config.host}:{config.port}"
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as e:  # newer grpcio raises, older ones return 0
        log.debug("bind failed: %s", e)
        port = 0
    if port == 0:
        servicer.close()
        server.stop(None).wait(10)
        raise StartupError(
            f"cannot listen on {address} (port in use or address not local); pick another --port, or 0 for any free one"
        )
    for name in ("", SERVICE_NAME):
        server.call(health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    asyncio.run_coroutine_threadsafe(trim_periodically(TRIM_EVERY_S), server.loop)
    return server, port, servicer, health_servicer


def shutdown(
    server: AioServer, servicer: EditServicer, health_servicer: health.aio.HealthServicer, grace_s: float
) -> bool:
    """Graceful stop: health NOT_SERVING, no new edits (UNAVAILABLE), the accepted ones finished and answered for
    up to grace_s, open streams ended, then the server stopped. Returns True if nothing accepted was dropped."""
    start = time.monotonic()
    server.call(health_servicer.enter_graceful_shutdown())
    finished = servicer.drain(grace_s)
    if not finished:
        log.warning("grace period of %.1f s over with edits unfinished; cancelling them", grace_s)
    servicer.close()
    # A moment for the last responses and stream ends to reach the clients, within the grace period.
    server.stop(grace=max(0.5, min(2.0, grace_s - (time.monotonic() - start)))).wait()
    return finished


def write_port_file(path: Path, port: int) -> None:
    """Write `port` to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def remove_port_file(path: Path, port: int) -> None:
    """Remove `path` if it still names `port` (a newer server may have replaced it)."""
    try:
        if Path(path).read_text().strip() == str(port):
            Path(path).unlink()
    except OSError:
        pass


def serve(config: ServerConfig) -> None:
    """Create the backend, serve until SIGTERM or SIGINT, then drain and stop (see `shutdown`).

    Raises:
        StartupError: the server cannot start (bad option, missing weights, no such device, busy port).
    """
    try:
        config.validate()
    except ValueError as e:
        raise StartupError(str(e)) from e
    try:
        backend = backend_of(config)
    except BackendUnavailable as e:
        raise StartupError(str(e)) from e
    info = backend.info()
    metrics = ServerMetrics()
    server, port, servicer, health_servicer = build_server(config, backend, metrics)
    metrics_port = None
    if config.metrics_port:
        try:
            metrics_port = metrics.serve_http(config.host, config.metrics_port)
        except OSError as e:
            servicer.close()
            server.stop(None).wait(10)
            raise StartupError(
                f"--metrics-port {config.metrics_port}: cannot listen on it ({e.strerror or e}); pick another port"
            ) from e
    token = resolve_token(config)
    if token is None and config.host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning(
            "listening on %s without a token: anyone who reaches the port can use the server (see --token)", config.host
        )

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    if config.port_file is not None:
        write_port_file(config.port_file, port)
    security = ("tls" if config.tls_cert else "plaintext") + (", token" if token else "")
    banner = (
        f"diffusion_server: serving {config.backend} (model={info.model or '-'}, device={info.device}, "
        f"precision={info.precision}) on {config.host}:{port}"
    )
    extras = (
        f" [{security}; max batch {resolve_max_batch(config, backend)}; memory budget {config.budget_mb} MiB "
        f"(--max-buffer-mb), originals cache {config.cache_mb} MiB of it"
        + (f"; metrics on :{metrics_port}" if metrics_port else "")
        + "]"
    )
    if config.log_format == "json":
        print(
            json.dumps(
                {
                    "event": "serving",
                    "msg": banner + extras,
                    "backend": config.backend,
                    "model": info.model,
                    "device": info.device,
                    "precision": info.precision,
                    "host": config.host,
                    "port": port,
                    "metrics_port": metrics_port,
                    "tls": bool(config.tls_cert),
                    "token": bool(token),
                    "max_buffer_mb": config.budget_mb,
                    "original_cache_mb": config.cache_mb,
                }
            ),
            flush=True,
        )
    else:
        print(banner + extras, flush=True)
    stop.wait()
    log.info("stopping: finishing accepted edits (up to %.1f s)", config.grace_s)
    finished = shutdown(server, servicer, health_servicer, config.grace_s)
    metrics.close()
    if config.port_file is not None:
        remove_port_file(config.port_file, port)
    log.info("stopped%s", "" if finished else " (some edits were cancelled at the end of the grace period)")


def run_cli(config: ServerConfig) -> int:
    """Serve `config`; returns the process exit code. Start-up failures print one line on stderr."""
    configure_logging(config.log_level, config.log_format)
    try:
        serve(config)
    except StartupError as e:
        print(f"diffusion_server: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.debug("start-up failed", exc_info=True)
        message = " ".join(str(e).split()) or type(e).__name__
        print(
            f"diffusion_server: error: {type(e).__name__}: {message} (run with --log-level debug for details)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0

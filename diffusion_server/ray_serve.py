"""The diffusion server as a Ray Serve application: the same contract, backends, validation, limits and batching.

Ray Serve's gRPC proxy receives the calls and hands each to a replica of `EditReplica`, an actor that holds
one backend and one `EditServicer` (diffusion_server/service.py; request parsing, validation and the original
cache in validation.py, the batching worker in worker.py), exactly as the standalone server does; only the
transport differs. Each replica may own a GPU (`num_gpus`), Ray places them over the cluster, restarts those
that die and, with autoscaling, adds or removes them as the number of ongoing requests (open streams and
unary calls) per replica changes.

The proxy decodes requests with `service.add_edit_service`'s tolerant deserializers (named in
gRPCOptions.grpc_servicer_functions), so a malformed message still gets INVALID_ARGUMENT from the replica.
A stream is pinned to one replica for its life; if that replica dies the stream ends with INTERNAL and the
client re-sends what had no answer (`client.StreamClient`). The proxy serves no grpc.health.v1: clients take
a successful Describe as readiness. TLS is not served by the proxy (put it behind a TLS-terminating proxy or
a tunnel); the bearer token is checked by the replicas.

Start it with `make serve-ray` / `python -m diffusion_server.ray_serve --help`, or on a running cluster with
`serve run diffusion_server/ray_serve.yaml` (see README, "Many machines: Ray Serve").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from diffusion_server.auth import UNAUTHENTICATED_MESSAGE, BearerToken
from diffusion_server.config import ServerConfig

log = logging.getLogger(__name__)

APP_NAME = "in2n"
SERVICER_FUNCTION = "diffusion_server.service.add_edit_service"
"""Import path given to Ray Serve's gRPCOptions.grpc_servicer_functions: EditService with tolerant deserializers."""


@dataclass
class RayServeConfig(ServerConfig):
    """Serve an image-editing backend as a Ray Serve application (in2n.v1.EditService through Ray's gRPC proxy).

    The backend options and limits are those of `python -m diffusion_server`; --port is the gRPC proxy's port
    (on every node of the cluster, all interfaces). --host, --tls-*, --metrics-port and --grace-s do not apply.
    """

    device: str = "cpu"
    """Torch device of each replica's backend: cpu, or cuda (each replica sees only the GPUs Ray gives it: set --gpus-per-replica)."""
    replicas: int = 1
    """Replicas started; with --max-replicas above it, the autoscaler's lower bound."""
    max_replicas: int = 0
    """Autoscaling's upper bound; 0: no autoscaling (exactly --replicas)."""
    target_ongoing_requests: float = 2.0
    """Autoscaling target: ongoing requests (open streams and unary calls) per replica."""
    gpus_per_replica: float = 0.0
    """GPUs each replica holds (Ray's num_gpus; 1 places one replica per GPU; fractions share a GPU)."""
    cpus_per_replica: float = 1.0
    """CPUs each replica holds (Ray's num_cpus)."""
    max_ongoing_requests: int = 16
    """Streams and unary calls one replica serves at once (an open stream counts for its whole life); more wait in the proxy."""
    ray_address: str | None = None
    """Join this Ray cluster (head's host:6379, or auto); unset: start a local Ray instance in this process."""
    http_port: int = 8000
    """Port of Ray Serve's HTTP proxy (unused by this application; it starts with Serve)."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance (without --ray-address); unset: all of this machine's."""
    detach: bool = False
    """Deploy and exit, leaving the application running on the cluster (needs --ray-address); default: serve until SIGTERM/SIGINT, then shut the application down."""

    def validate(self) -> None:
        super().validate()
        for flag, value, default in (
            ("--host", self.host, "127.0.0.1"), ("--tls-cert", self.tls_cert, None), ("--tls-key", self.tls_key, None),
            ("--metrics-port", self.metrics_port, 0),
        ):  # fmt: skip
            if value != default:
                raise ValueError(
                    f"{flag}: not available with Ray Serve (its proxy listens on all interfaces, plaintext; "
                    "use the standalone server, or put a TLS proxy in front)"
                )
        if self.port == 0:
            raise ValueError("--port: give a fixed port for Ray Serve's gRPC proxy (0 is not supported)")
        if self.replicas < 0 or (self.replicas == 0 and self.max_replicas == 0):
            raise ValueError(f"--replicas must be >= 1 (or >= 0 with --max-replicas), got {self.replicas}")
        if self.max_replicas and self.max_replicas < max(1, self.replicas):
            raise ValueError(
                f"--max-replicas ({self.max_replicas}) must be >= --replicas ({self.replicas}), or 0 for no autoscaling"
            )
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("--gpus-per-replica and --cpus-per-replica must be >= 0")
        if self.gpus_per_replica == 0 and self.device.startswith("cuda"):
            raise ValueError(
                f"--device {self.device} needs --gpus-per-replica > 0 (Ray shows a replica only the GPUs it holds)"
            )
        if self.max_ongoing_requests < 1:
            raise ValueError(f"--max-ongoing-requests must be >= 1, got {self.max_ongoing_requests}")
        if self.detach and not self.ray_address:
            raise ValueError("--detach needs --ray-address (a local Ray instance ends with this process)")
        if self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device}: Ray chooses each replica's GPU; use --device cuda")


def server_config_of(config: ServerConfig) -> ServerConfig:
    """The plain ServerConfig part of `config` (what a replica needs), picklable without this module's extras."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in dataclasses.asdict(config).items() if k in names})


# -- inside a replica ----------------------------------------------------------------------------------


class _Aborted(Exception):
    """Raised by `_ReplicaContext.abort`: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class _ReplicaContext:
    """What `EditServicer` (a grpc.aio servicer) uses of a call's context, for a call that reached a Ray Serve
    replica: abort, write (a stream's responses go to the replica's generator), time_remaining, add_done_callback.

    Ray does not pass the call's deadline to the replica (time_remaining is None; `timeout_ms` in the request
    still bounds an edit); the call is over when `finish` runs (answered, failed, or the client went away).
    """

    def __init__(self, write: Callable[[Any], Any] | None = None) -> None:
        self._write = write
        self._callbacks: list[Callable[[Any], None]] = []
        self._done = False

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    async def write(self, message: Any) -> None:
        assert self._write is not None, "write on a unary call"
        await self._write(message)

    def time_remaining(self) -> float | None:
        return None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def finish(self) -> None:
        """The call is over: run the callbacks once."""
        if self._done:
            return
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("call-end callback failed")


_END = object()


class EditReplica:
    """One Ray Serve replica: a backend and an `EditServicer` over it. Its methods are named like the RPCs and
    run the servicer's coroutines on the replica's event loop."""

    def __init__(self, config: ServerConfig):
        from diffusion_server.server import backend_of, configure_logging, resolve_token, service_limits
        from diffusion_server.service import EditServicer

        configure_logging(config.log_level, config.log_format)  # on the replica's stderr (Ray's worker log)
        backend = backend_of(config)
        self._servicer = EditServicer(backend, service_limits(config, backend))
        token = resolve_token(config)
        self._token = BearerToken(token) if token else None
        log.info("replica ready: %s on %s (pid %d)", config.backend, config.device, os.getpid())

    def _check_token(self, grpc_context: Any) -> None:
        if self._token is None:
            return
        if not self._token.accepts(grpc_context.invocation_metadata() if grpc_context is not None else None):
            raise _Aborted(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    @staticmethod
    def _fail(grpc_context: Any, error: _Aborted) -> None:
        """End the call with error's status: Ray Serve keeps a code set on the context when the method raises."""
        if grpc_context is not None:
            grpc_context.set_code(error.code)
            grpc_context.set_details(error.details)
        raise RuntimeError(str(error)) from None  # a plain exception: the proxy unpickles it without this module

    async def Describe(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            self._check_token(grpc_context)
            return await self._servicer.Describe(request, _ReplicaContext())
        except _Aborted as e:
            self._fail(grpc_context, e)

    async def Edit(self, request: Any, grpc_context: Any = None) -> Any:
        context = _ReplicaContext()
        try:
            self._check_token(grpc_context)
            return await self._servicer.Edit(request, context)
        except _Aborted as e:
            self._fail(grpc_context, e)
        finally:
            context.finish()  # the client gone (Ray cancelled us): drop the edit if it has not started

    async def StreamEdit(self, request_stream: AsyncIterator[Any], grpc_context: Any = None) -> AsyncIterator[Any]:
        """Run `EditServicer.StreamEdit` (a coroutine that writes its responses) and yield what it writes."""
        try:
            self._check_token(grpc_context)
        except _Aborted as e:
            self._fail(grpc_context, e)
        out: asyncio.Queue[object] = asyncio.Queue(maxsize=1)  # a write waits until its response is taken
        context = _ReplicaContext(write=out.put)
        log.info("StreamEdit opened on replica pid %d", os.getpid())

        async def serve() -> None:
            try:
                await self._servicer.StreamEdit(request_stream, context)
            finally:
                await out.put(_END)

        serving = asyncio.ensure_future(serve())
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                yield item
            await serving  # raises _Aborted (e.g. RESOURCE_EXHAUSTED: too many streams) or what failed
        except _Aborted as e:
            self._fail(grpc_context, e)
        finally:
            context.finish()
            if not serving.done():
                serving.cancel()  # the client went away: the servicer ends the stream and cancels its edits
            log.info("StreamEdit closed on replica pid %d", os.getpid())


# -- the application -----------------------------------------------------------------------------------


def build_app(config: RayServeConfig) -> Any:
    """The bound Ray Serve application for `config` (replicas, resources and autoscaling from it)."""
    from ray import serve

    options: dict[str, Any] = {
        "name": "EditService",
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if config.max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas,
            "initial_replicas": max(1, config.replicas),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.replicas
    # By its module path, also under `python -m` (where this file is __main__): replicas import it, not unpickle a copy.
    from diffusion_server.ray_serve import EditReplica as replica_class

    return serve.deployment(replica_class).options(**options).bind(server_config_of(config))


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` (import path `diffusion_server.ray_serve:app_builder`):
    `args` are RayServeConfig fields by name (e.g. backend, device, replicas, gpus_per_replica, max_replicas)."""
    known = {f.name for f in dataclasses.fields(RayServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    defaults = RayServeConfig()
    typed = {}
    for name, value in args.items():  # `serve run module:app_builder replicas=2` passes text
        default = getattr(defaults, name)
        if isinstance(value, str) and isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif isinstance(value, str) and isinstance(default, (int, float)):
            value = type(default)(value)
        typed[name] = value
    config = RayServeConfig(**typed)
    config.validate()
    return build_app(config)


def grpc_options(port: int) -> Any:
    """Ray Serve's gRPC proxy options for EditService on `port`."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION])


def _runtime_env() -> dict[str, Any]:
    """Workers of a local instance import this checkout (the proxy needs the generated code and the service)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def run(config: RayServeConfig) -> None:
    """Start (or join) Ray, start Serve with the gRPC proxy on config.port, deploy, then serve until SIGTERM/SIGINT."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    config.validate()
    if config.ray_address:
        ray.init(address=config.ray_address, namespace="serve", log_to_driver=False)
    else:
        # The replicas' log lines come out here too, each prefixed with its process.
        ray.init(num_cpus=config.num_cpus, namespace="serve", runtime_env=_runtime_env(), include_dashboard=False)
    # Ray's HTTP proxy serves nothing of this application, but Ray 2.60 starts the gRPC proxy only beside it:
    # it listens on this machine alone.
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=config.http_port), grpc_options=grpc_options(config.port)
    )
    serve.run(build_app(config), name=APP_NAME)
    if config.port_file is not None:
        from diffusion_server.server import write_port_file

        write_port_file(config.port_file, config.port)
    replicas = (
        f"{config.replicas}..{config.max_replicas} replicas (autoscaling)"
        if config.max_replicas
        else f"{config.replicas} replica(s)"
    )
    print(
        f"diffusion_server.ray_serve: serving {config.backend} on Ray Serve's gRPC proxy, port {config.port}: {replicas}, "
        f"{config.gpus_per_replica:g} GPU and {config.cpus_per_replica:g} CPU each, device {config.device}",
        flush=True,
    )
    if config.detach:
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda signum, frame: stop.set())
    stop.wait()
    print("diffusion_server.ray_serve: stopping", flush=True)
    serve.shutdown()
    ray.shutdown()
    if config.port_file is not None:
        from diffusion_server.server import remove_port_file

        remove_port_file(config.port_file, config.port)


def main(argv: list[str] | None = None) -> int:
    import tyro

    from diffusion_server.__main__ import refuse_unknown_backend
    from diffusion_server.server import configure_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if refuse_unknown_backend(args, "diffusion_server.ray_serve"):
        return 2
    config = tyro.cli(RayServeConfig, args=args, prog="python -m diffusion_server.ray_serve")
    configure_logging(config.log_level, config.log_format)
    try:
        config.validate()
    except ValueError as e:
        print(f"diffusion_server.ray_serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print(
            "diffusion_server.ray_serve: error: Ray Serve is not installed here; use the server's environment "
            "(make setup-server, .venv-server) or pip install '.[ray]'",
            file=sys.stderr,
            flush=True,
        )
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

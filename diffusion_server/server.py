"""Build and run the gRPC server: EditService, health checking and reflection."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Tuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffusion_server.backends import BackendUnavailable, create_backend
from diffusion_server.backends.base import EditBackend
from diffusion_server.config import ServerConfig
from diffusion_server.service import EditServicer, ServiceLimits
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EditService"].full_name  # "in2n.v1.EditService"


class StartupError(RuntimeError):
    """The server cannot start; the message is one line saying what to do."""


def build_server(config: ServerConfig, backend: EditBackend) -> Tuple[grpc.Server, int, EditServicer, health.HealthServicer]:
    """Create (not start) a server for `backend` bound to config.host:config.port.

    Returns (server, actual port, servicer, health servicer).
    """
    limits = ServiceLimits(
        max_image_side=config.max_image_side,
        max_diffusion_steps=config.max_diffusion_steps,
        max_queued=config.max_queued,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ],
    )
    servicer = EditServicer(backend, config.backend, limits)
    pb_grpc.add_EditServiceServicer_to_server(servicer, server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )

    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # newer grpcio raises, older ones return 0
        log.debug("bind failed: %s", e)
        port = 0
    if port == 0:
        servicer.close()
        raise StartupError(f"cannot listen on {address} (port in use or address not local); pick another --port, or 0 for any free one")
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer, health_servicer


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
    """Create the backend, serve until SIGTERM or SIGINT, then stop gracefully.

    Raises:
        StartupError: the server cannot start (bad option, missing weights, no such device, busy port).
    """
    try:
        config.validate()
    except ValueError as e:
        raise StartupError(str(e)) from e
    try:
        backend = create_backend(config.backend, config.model, config.device, config.precision, config.seed)
    except BackendUnavailable as e:
        raise StartupError(str(e)) from e
    info = backend.info()
    server, port, servicer, health_servicer = build_server(config, backend)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    if config.port_file is not None:
        write_port_file(config.port_file, port)
    print(
        f"diffusion_server: serving {config.backend} (model={info.model or '-'}, device={info.device}, "
        f"precision={info.precision}) on {config.host}:{port}",
        flush=True,
    )
    stop.wait()
    log.info("stopping (5 s grace)")
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    servicer.close()
    if config.port_file is not None:
        remove_port_file(config.port_file, port)
    log.info("stopped")


def run_cli(config: ServerConfig) -> int:
    """Serve `config`; returns the process exit code. Start-up failures print one line on stderr."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        serve(config)
    except StartupError as e:
        print(f"diffusion_server: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - an unforeseen start-up failure: one line, traceback only when debugging
        log.debug("start-up failed", exc_info=True)
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"diffusion_server: error: {type(e).__name__}: {message} (run with --log-level debug for details)", file=sys.stderr, flush=True)
        return 1
    return 0

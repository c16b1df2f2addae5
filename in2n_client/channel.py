"""The channel to a diffusion server: options, TLS, the bearer token, status codes, readiness, message size."""

from __future__ import annotations

import os
import time
from typing import Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from in2n_contract import (
    DEFAULT_MAX_IMAGE_SIDE,
    HTTP2_WINDOW_BYTES,
    SERVICE_NAME,
    max_message_bytes_for,
    pb,
    pb_grpc,
)

DEFAULT_MAX_MESSAGE_BYTES = max_message_bytes_for(DEFAULT_MAX_IMAGE_SIDE)
_STATUS_OF_VALUE = {code.value[0]: code for code in grpc.StatusCode}
NOT_READY = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.NOT_FOUND,
    }
)
"""Codes that mean "no server answering yet" to a readiness check (NOT_FOUND: the health service does not know
EditService yet, or Ray Serve's proxy has no application yet)."""


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


def server_ready(channel: grpc.Channel, timeout_s: float, metadata: tuple | None) -> bool:
    """One readiness check, waiting up to timeout_s for a connection (gRPC retries it meanwhile).

    True once grpc.health.v1 reports SERVING for EditService; where health checking is UNIMPLEMENTED (Ray Serve's
    proxy), once Describe answers (a replica is up behind the proxy). False while a call fails with a code in
    NOT_READY, or the server is not SERVING. True for any other error (e.g. UNAUTHENTICATED): the server is up,
    and the call itself will say what is wrong. A real RPC rather than a connectivity watch: it proves the server
    is up, and it leaves no watcher thread behind when the channel closes.
    """
    started = time.monotonic()
    try:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s, wait_for_ready=True).status
        return status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            return e.code() not in NOT_READY
    remaining = max(0.1, timeout_s - (time.monotonic() - started))
    try:
        pb_grpc.EditServiceStub(channel).Describe(pb.DescribeRequest(), timeout=remaining, metadata=metadata)
    except grpc.RpcError as e:
        return e.code() not in NOT_READY
    return True


def check_size(request: pb.EditRequest, max_message_bytes: int) -> None:
    size = request.ByteSize()
    if size > max_message_bytes:
        raise ValueError(
            f"the request takes {size} bytes, over the message limit of {max_message_bytes} bytes "
            f"(sized for render + original up to 2048x2048 RGB float32); send smaller images or uint8"
        )

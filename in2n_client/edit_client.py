"""`EditClient`: blocking calls (Edit, Describe, health) for scripts, tests and the trainer's sync mode."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
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
)
from in2n_contract import EditParams, pb, pb_grpc
from in2n_contract.codec import decode_image
from in2n_contract.messages import make_request

LARGEST_SIDE = 1 << 16
"""Responses are not size-limited by the clients beyond the message limit."""


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
        check_size(request, self._max_message_bytes)
        try:
            response = self._stub.Edit(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EditFailed(e.code(), e.details() or "") from None
        return EditReply(
            request_id=response.request_id,
            view_id=response.view_id,
            image=decode_image(response.edited, "edited", max_side=LARGEST_SIDE),
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
        """Block until the server is ready (`server_ready`: health SERVING, or Describe answering behind Ray Serve's
        proxy); TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"diffusion server at {self.address} not ready after {timeout_s:g} s")
            if server_ready(self._channel, remaining, self._metadata):
                return
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # not ready yet: ask again

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

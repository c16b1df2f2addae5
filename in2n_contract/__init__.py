"""in2n_contract: the Python side of the contract `protos/in2n/v1/edit_service.proto`.

What both ends of `in2n.v1.EditService` agree on, in one place that the client, the server,
the backends and the trainer's config all import (nothing here imports torch or the server):

- `EditParams` and the method defaults (Instruct-NeRF2NeRF's) a request's unset fields take;
- limits: `max_message_bytes_for` (the gRPC message size that two images of a side need), the longest
  texts (`MAX_INSTRUCTION_CHARS`, `MAX_REQUEST_ID_CHARS`, `MAX_CLIENT_ID_CHARS`) and the largest
  guidance scale (`MAX_GUIDANCE`) a request may carry;
- the service name and the generated modules (`pb`, `pb_grpc`);
- the starts of status messages clients and tests recognise (`ORIGINAL_NOT_CACHED`, `ORIGINAL_REQUIRED`, `STREAM_IDLE`).
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EditService"].full_name
"""The full gRPC name of the service ("in2n.v1.EditService"): health checks and reflection use it."""

# Method defaults (Instruct-NeRF2NeRF), used where a request leaves a field unset.
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5
DEFAULT_DIFFUSION_STEPS = 20
DEFAULT_LOWER_BOUND = 0.02
DEFAULT_UPPER_BOUND = 0.98


@dataclass(frozen=True)
class EditParams:
    """Parameters of one edit, validated by the service before a backend sees them."""

    instruction: str
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    diffusion_steps: int = DEFAULT_DIFFUSION_STEPS
    lower_bound: float = DEFAULT_LOWER_BOUND
    upper_bound: float = DEFAULT_UPPER_BOUND
    seed: int | None = None


# Headroom over two images' pixels for the rest of a request (instruction, ids, framing).
HTTP2_WINDOW_BYTES = 16 << 20
"""The HTTP/2 stream window both ends use: a whole image per window, no flow-control round trips inside one."""

MESSAGE_HEADROOM_BYTES = 4 << 20
DEFAULT_MAX_IMAGE_SIDE = 2048
"""The server's --max-image-side default; clients size their message limit for it."""


def max_message_bytes_for(max_image_side: int) -> int:
    """Largest gRPC message needed for two max_image_side^2 x 3 float32 images, plus headroom."""
    return 2 * max_image_side * max_image_side * 3 * 4 + MESSAGE_HEADROOM_BYTES


# Request limits: the server answers INVALID_ARGUMENT past them (naming the field).
MAX_INSTRUCTION_CHARS = 1000
MAX_REQUEST_ID_CHARS = 256
MAX_CLIENT_ID_CHARS = 256
MAX_GUIDANCE = 100.0
"""Largest guidance_scale and image_guidance_scale (both are in [0, MAX_GUIDANCE])."""


ORIGINAL_NOT_CACHED = "original not cached"
"""Start of the FAILED_PRECONDITION message of a request whose original the server does not hold;
the client then sends the request again with the original."""
ORIGINAL_REQUIRED = "original is required"
"""Start of the INVALID_ARGUMENT message of a request with neither original nor original_key."""

STREAM_IDLE = "stream idle for"
"""Start of the UNAVAILABLE message with which the server closes a stream idle past its
--stream-idle-timeout-s (nothing read, nothing in flight); the client opens a new one when it has work."""

__all__ = [
    "DEFAULT_DIFFUSION_STEPS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_IMAGE_GUIDANCE_SCALE",
    "DEFAULT_LOWER_BOUND",
    "DEFAULT_MAX_IMAGE_SIDE",
    "DEFAULT_UPPER_BOUND",
    "MAX_CLIENT_ID_CHARS",
    "MAX_GUIDANCE",
    "MAX_INSTRUCTION_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "MESSAGE_HEADROOM_BYTES",
    "ORIGINAL_NOT_CACHED",
    "ORIGINAL_REQUIRED",
    "SERVICE_NAME",
    "STREAM_IDLE",
    "EditParams",
    "max_message_bytes_for",
    "pb",
    "pb_grpc",
]

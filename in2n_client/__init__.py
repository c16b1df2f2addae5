"""in2n_client: the Python clients of `in2n.v1.EditService` (no torch, nothing of the server).

- `EditClient` (`edit_client.py`): blocking calls for scripts and tests (Edit, Describe, health).
- `StreamClient` (`stream_client.py`): the trainer's path, one bidirectional stream on a background thread;
  `submit` and `poll` never block on the network.
- `channel.py`: what both share: channel options, TLS, the bearer token, status codes, readiness.

Readiness is grpc.health.v1's answer, or Describe's where health checking is UNIMPLEMENTED (Ray Serve's gRPC
proxy). Both clients take `token=` (sent as `authorization: Bearer <token>` metadata) and `root_cert=` (PEM bytes
or a path: TLS, checking the server's certificate against it) or `tls=True` (TLS with the system's roots); all off
by default.
"""

from in2n_client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    auth_metadata,
    channel_options,
    make_channel,
    status_code,
)
from in2n_client.edit_client import EditClient, EditFailed, EditReply, timings_dict
from in2n_client.stream_client import MAX_RESENDS, StreamClient, StreamResult
from in2n_contract.codec import original_key
from in2n_contract.messages import make_request

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_RESENDS",
    "EditClient",
    "EditFailed",
    "EditReply",
    "StreamClient",
    "StreamResult",
    "auth_metadata",
    "channel_options",
    "make_channel",
    "make_request",
    "original_key",
    "status_code",
    "timings_dict",
]

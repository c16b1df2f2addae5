"""ServerConfig: every option of `python -m diffusion_server` (parsed by tyro; field docstrings are the --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from diffusion_server.backends import BackendName, Precision

# Headroom over two images' pixels for the rest of a request (instruction, ids, framing).
_MESSAGE_HEADROOM_BYTES = 4 << 20


def max_message_bytes_for(max_image_side: int) -> int:
    """Largest gRPC message needed for two max_image_side^2 x 3 float32 images, plus headroom."""
    return 2 * max_image_side * max_image_side * 3 * 4 + _MESSAGE_HEADROOM_BYTES


@dataclass
class ServerConfig:
    """Serve an image-editing backend over gRPC (in2n.v1.EditService)."""

    backend: BackendName = "ip2p"
    """Editing backend: ip2p (InstructPix2Pix weights), tiny-ip2p (tiny random IP2P, for tests) or palette (classical colour looks, no weights)."""
    model: str = "timbrooks/instruct-pix2pix"
    """Model id on the Hugging Face hub or a local folder (ip2p only; already downloaded, nothing is fetched)."""
    device: str = "cuda:0"
    """Torch device of the backend: cpu, cuda or cuda:N (palette always runs on the CPU)."""
    precision: Precision = "auto"
    """Weights precision; auto is fp16 on CUDA and fp32 on the CPU."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 or [::] for all interfaces)."""
    port: int = 50051
    """Port to listen on; 0 picks a free one (see --port-file)."""
    port_file: Optional[Path] = None
    """After binding, write the actual port to this file (atomically), e.g. for --port 0."""
    max_image_side: int = 2048
    """Largest image height or width accepted, in pixels; also sizes the gRPC message limit."""
    max_diffusion_steps: int = 1000
    """Most diffusion steps one request may ask for."""
    seed: int = 0
    """Initialisation seed of tiny-ip2p's random weights."""
    max_queued: int = 32
    """Most edits queued or running at once, over all clients; more are refused with RESOURCE_EXHAUSTED."""
    rpc_threads: int = 16
    """Threads serving RPCs (each open stream holds one)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level of the server's log on stderr."""

    @property
    def max_message_bytes(self) -> int:
        """gRPC send/receive limit in bytes."""
        return max_message_bytes_for(self.max_image_side)

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first bad value."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not 8 <= self.max_image_side <= 16384:
            raise ValueError(f"--max-image-side must be in [8, 16384], got {self.max_image_side}")
        if not 1 <= self.max_diffusion_steps <= 1000:
            raise ValueError(f"--max-diffusion-steps must be in [1, 1000], got {self.max_diffusion_steps}")
        if self.max_queued < 1:
            raise ValueError(f"--max-queued must be >= 1, got {self.max_queued}")
        if self.rpc_threads < 2:
            raise ValueError(f"--rpc-threads must be >= 2, got {self.rpc_threads}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")

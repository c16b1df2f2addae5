"""ServerConfig: every option of `python -m diffusion_server` (parsed by tyro; field docstrings are the --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffusion_server.backends import DEFAULT_IP2P_MODEL, BackendName, Precision
from diffusion_server.memory import default_max_buffer_mb, default_original_cache_mb
from in2n_contract import DEFAULT_MAX_IMAGE_SIDE, max_message_bytes_for


@dataclass
class ServerConfig:
    """Serve an image-editing backend over gRPC (in2n.v1.EditService)."""

    backend: BackendName = "ip2p"
    """Editing backend: ip2p (InstructPix2Pix weights), ip2p-xl (InstructPix2Pix on SDXL weights), tiny-ip2p (tiny random IP2P, for tests), flux-kontext (FLUX.1 Kontext weights, bf16), tiny-flux-kontext (tiny random Kontext, for tests), palette (classical colour looks, no weights), stochastic (random colour looks, a stand-in for diffusion's randomness; the consistency experiment) or identity (returns the render; benchmarks)."""
    model: str = DEFAULT_IP2P_MODEL
    """Model id on the Hugging Face hub or a local folder (ip2p, ip2p-xl: default diffusers/sdxl-instructpix2pix-768, flux-kontext: default black-forest-labs/FLUX.1-Kontext-dev, gated; loaded from the cache first)."""
    device: str = "cuda:0"
    """Torch device of the backend: cpu, cuda or cuda:N (palette always runs on the CPU)."""
    precision: Precision = "auto"
    """Weights precision; auto is fp16 on CUDA and fp32 on the CPU."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 or [::] for all interfaces)."""
    port: int = 50051
    """Port to listen on; 0 picks a free one (see --port-file)."""
    port_file: Path | None = None
    """After binding, write the actual port to this file (atomically), e.g. for --port 0."""
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    """Largest image height or width accepted, in pixels; also sizes the gRPC message limit."""
    max_diffusion_steps: int = 1000
    """Most diffusion steps one request may ask for."""
    seed: int = 0
    """Initialisation seed of tiny-ip2p's random weights; stochastic: seeds the random draws of edits that bring no seed."""
    max_queued: int = 32
    """Most edits queued or running at once, over all clients; more are refused with RESOURCE_EXHAUSTED."""
    rpc_threads: int = 16
    """Threads that validate and decode requests (images, originals' keys). No RPC holds a thread while it waits: the server runs on asyncio."""
    max_streams: int = 64
    """Most StreamEdit streams open at once, over all clients; a new stream beyond it gets RESOURCE_EXHAUSTED at once."""
    stream_idle_timeout_s: float = 600.0
    """A stream with no request from its client and nothing of its own in flight for this many seconds is closed (UNAVAILABLE, "stream idle ..."); so is one whose client reads no response for this long while one waits to be sent (UNAVAILABLE, "... not reading its responses ..."); 0: never."""
    connection_idle_timeout_s: float = 300.0
    """A connection with no call open for this many seconds is closed (HTTP/2 GOAWAY; gRPC clients reconnect on their next call), and so is a raw TCP connection that never opens one; 0: never."""
    max_stream_backlog: int = 32
    """Most responses one stream may owe its client (requests read whose answer is not yet sent: edits in flight, answers the client has not taken); at this bound the server stops reading that stream's requests until the client reads (back-pressure)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level of the server's log on stderr."""
    log_format: Literal["text", "json"] = "text"
    """Log lines on stderr: human text, or one JSON object per line (ts, level, logger, msg, ...)."""
    max_batch: int | None = None
    """Most queued edits run as one backend call (backends that batch: ip2p, ip2p-xl, tiny-ip2p, identity); 1: no batching; default: the backend's own (8 for ip2p, with --max-delay-ms 0: what is queued runs together, nothing waits)."""
    max_delay_ms: float = 0.0
    """Longest wait for more edits to fill a batch, in milliseconds (0: take only what is already queued)."""
    max_buffer_mb: int | None = None
    """Memory budget in MiB for everything the server holds for its clients: requests queued or running (their images as sent and decoded), answers not yet taken, and the originals cache (its share, --original-cache-mb). A unary request that does not fit is refused at once (RESOURCE_EXHAUSTED naming this option); a stream waits, its further requests unread, until there is room. Default: a quarter of the machine's memory, at most 8192 (printed at start-up)."""
    original_cache_mb: int | None = None
    """The originals cache's share of --max-buffer-mb, in MiB (originals cached per (client, view), least recently used evicted within it); 0 turns the cache off (then every request must carry its original). Default: a quarter of the budget, at most 1024."""
    metrics_port: int = 0
    """Serve Prometheus metrics on http://HOST:PORT/metrics; 0: off."""
    grace_s: float = 30.0
    """On SIGTERM or SIGINT: stop taking edits, finish those accepted for up to this many seconds, then exit."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server: serve TLS (with --tls-key)."""
    tls_key: Path | None = None
    """PEM private key of --tls-cert."""
    token: str | None = None
    """Bearer token every request must carry (metadata `authorization: Bearer TOKEN`); default: $IN2N_TOKEN, unset: no token. Health checks stay open."""
    channels_last: bool = False
    """ip2p/ip2p-xl/tiny-ip2p: UNet and VAE in channels_last memory format (often faster on CUDA)."""
    compile: bool = False
    """ip2p/ip2p-xl/tiny-ip2p: torch.compile the UNet (checked with one warm-up edit at start-up)."""
    cpu_offload: bool = False
    """ip2p/ip2p-xl/tiny-ip2p on CUDA: keep weights in CPU memory, move each model to the GPU only while it runs."""
    delay_ms: float = 0.0
    """identity only: every edit takes this many milliseconds (a sleep: a fixed cost per edit, for load tests); 0: no cost."""

    @property
    def max_message_bytes(self) -> int:
        """gRPC send/receive limit in bytes."""
        return max_message_bytes_for(self.max_image_side)

    @property
    def budget_mb(self) -> int:
        """--max-buffer-mb, or its default for this machine."""
        return self.max_buffer_mb if self.max_buffer_mb is not None else default_max_buffer_mb()

    @property
    def cache_mb(self) -> int:
        """--original-cache-mb, or its default share of the budget."""
        return (
            self.original_cache_mb if self.original_cache_mb is not None else default_original_cache_mb(self.budget_mb)
        )

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
        if self.rpc_threads < 1:
            raise ValueError(f"--rpc-threads must be >= 1, got {self.rpc_threads}")
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be >= 1, got {self.max_streams}")
        if not (math.isfinite(self.stream_idle_timeout_s) and self.stream_idle_timeout_s >= 0):
            raise ValueError(f"--stream-idle-timeout-s must be >= 0 (0: never), got {self.stream_idle_timeout_s}")
        if not (math.isfinite(self.connection_idle_timeout_s) and self.connection_idle_timeout_s >= 0):
            raise ValueError(
                f"--connection-idle-timeout-s must be >= 0 (0: never), got {self.connection_idle_timeout_s}"
            )
        if self.max_stream_backlog < 1:
            raise ValueError(f"--max-stream-backlog must be >= 1, got {self.max_stream_backlog}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.max_batch is not None and not 1 <= self.max_batch <= 256:
            raise ValueError(f"--max-batch must be in [1, 256], got {self.max_batch}")
        if not (0.0 <= self.max_delay_ms <= 10_000.0):
            raise ValueError(f"--max-delay-ms must be in [0, 10000], got {self.max_delay_ms}")
        if not (0.0 <= self.delay_ms <= 600_000.0):
            raise ValueError(f"--delay-ms must be in [0, 600000], got {self.delay_ms}")
        if self.delay_ms and self.backend != "identity":
            raise ValueError(
                f"--delay-ms: only the identity backend takes it (a fixed cost per edit, for load tests), not {self.backend}"
            )
        if self.max_buffer_mb is not None and self.max_buffer_mb < 1:
            raise ValueError(f"--max-buffer-mb must be >= 1, got {self.max_buffer_mb}")
        if self.original_cache_mb is not None and not 0 <= self.original_cache_mb < self.budget_mb:
            raise ValueError(
                f"--original-cache-mb must be >= 0 and below --max-buffer-mb ({self.budget_mb}), "
                f"got {self.original_cache_mb}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if not self.grace_s >= 0:
            raise ValueError(f"--grace-s must be >= 0, got {self.grace_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together; give both (PEM files) or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file; give a PEM file")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token (or IN2N_TOKEN) must not be empty")

"""Prometheus metrics of the server (prometheus_client, on a registry of its own).

`Metrics` is what the service reports, and does nothing (no --metrics-port, Ray replicas);
`ServerMetrics` records it on Prometheus metrics.

Exposed over HTTP by `serve()` when `--metrics-port` is set (`GET /metrics`):

- `in2n_queue_depth` (gauge): edits accepted and not yet started;
- `in2n_edits_in_progress` (gauge): edits queued or running;
- `in2n_batch_size` (histogram): edits the backend ran at once;
- `in2n_edit_latency_seconds{stage}` (histogram): queue, compute and total time of successful edits;
- `in2n_edits_total` (counter): edits answered with an image;
- `in2n_requests_total{method,code}` (counter): every answered request by gRPC status code name
  (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED, UNAUTHENTICATED, ...).
- `in2n_streams_open` (gauge): StreamEdit streams open (at most --max-streams);
- `in2n_streams_paused` (gauge): open streams whose requests the server does not read for now (back-pressure):
  their backlog of unsent responses is at --max-stream-backlog (the client does not read), or the memory
  budget (--max-buffer-mb) has no room for their next request;
- `in2n_streams_refused_total` (counter): streams refused with RESOURCE_EXHAUSTED (--max-streams reached);
- `in2n_streams_idle_closed_total` (counter): streams closed after --stream-idle-timeout-s idle;
- `in2n_streams_unread_closed_total` (counter): streams closed because their client took no response for
  --stream-idle-timeout-s (a response waited that long to be sent: the client does not read).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """What the service reports as it runs. This base does nothing: it is the metrics of a server without
    --metrics-port (and of Ray replicas), so the service calls it unconditionally."""

    def request_done(self, method: str, code_name: str) -> None:
        """A request of `method` was answered with gRPC status `code_name`."""

    def edit_done(self, queue_s: float, compute_s: float, total_s: float) -> None:
        """An edit was answered with an image."""

    def batch_ran(self, size: int) -> None:
        """The backend ran `size` edits at once."""

    def queue_changed(self, queued: int, pending: int) -> None:
        """Edits accepted and not started (`queued`), queued or running (`pending`)."""

    def streams_open_now(self, count: int) -> None:
        """`count` StreamEdit streams are open."""

    def stream_refused(self) -> None:
        """A stream was refused: --max-streams reached."""

    def stream_idle_closed(self) -> None:
        """A stream was closed after --stream-idle-timeout-s idle."""

    def stream_unread_closed(self) -> None:
        """A stream was closed because its client took no response for --stream-idle-timeout-s."""

    def stream_paused(self) -> None:
        """The server stopped reading a stream (back-pressure)."""

    def stream_resumed(self) -> None:
        """The server reads a paused stream again."""

    def close(self) -> None:
        """Stop serving the metrics (nothing here)."""


class ServerMetrics(Metrics):
    """All metrics of one server; safe to call from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("in2n_queue_depth", "Edits accepted and not yet started", registry=r)
        self.in_progress = Gauge("in2n_edits_in_progress", "Edits queued or running", registry=r)
        self.batch_size = Histogram(
            "in2n_batch_size", "Edits run by the backend at once", buckets=_BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "in2n_edit_latency_seconds",
            "Time of successful edits by stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.edits = Counter("in2n_edits", "Edits answered with an image", registry=r)
        self.requests = Counter(
            "in2n_requests", "Answered requests by method and gRPC status code", ["method", "code"], registry=r
        )
        self.streams_open = Gauge("in2n_streams_open", "StreamEdit streams open", registry=r)
        self.streams_paused = Gauge(
            "in2n_streams_paused",
            "Open streams not read for now: their backlog of unsent responses is at its bound",
            registry=r,
        )
        self.streams_refused = Counter("in2n_streams_refused", "Streams refused: too many open", registry=r)
        self.streams_idle_closed = Counter(
            "in2n_streams_idle_closed", "Streams closed by the server after idling", registry=r
        )
        self.streams_unread_closed = Counter(
            "in2n_streams_unread_closed",
            "Streams closed by the server because their client took no response",
            registry=r,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def request_done(self, method: str, code_name: str) -> None:
        self.requests.labels(method=method, code=code_name).inc()

    def edit_done(self, queue_s: float, compute_s: float, total_s: float) -> None:
        self.edits.inc()
        self.latency.labels(stage="queue").observe(queue_s)
        self.latency.labels(stage="compute").observe(compute_s)
        self.latency.labels(stage="total").observe(total_s)

    def batch_ran(self, size: int) -> None:
        self.batch_size.observe(size)

    def queue_changed(self, queued: int, pending: int) -> None:
        self.queue_depth.set(queued)
        self.in_progress.set(pending)

    def streams_open_now(self, count: int) -> None:
        self.streams_open.set(count)

    def stream_refused(self) -> None:
        self.streams_refused.inc()

    def stream_idle_closed(self) -> None:
        self.streams_idle_closed.inc()

    def stream_unread_closed(self) -> None:
        self.streams_unread_closed.inc()

    def stream_paused(self) -> None:
        self.streams_paused.inc()

    def stream_resumed(self) -> None:
        self.streams_paused.dec()

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port) in a daemon thread; returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            server = self._http[0]
            server.shutdown()
            server.server_close()
            self._http = None

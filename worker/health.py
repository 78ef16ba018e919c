"""HTTP endpoints for Kubernetes and Prometheus: /metrics, /healthz and /readyz, on one port.

/healthz fails when the worker is wedged: the consumer has not polled for more
than max_poll_gap_seconds, or the Kafka client reported a fatal error. /readyz
passes only once the model is loaded, a warm-up caption succeeded and the
consumer is in its group. It fails again while the worker is wedged, while it is
out of its group after a session timeout, and during an outage of S3 or the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.logs import fields
from worker.metrics import Metrics

logger = logging.getLogger(__name__)


class HealthState:
    """Liveness and readiness facts, set by the stream loop and read by the HTTP threads."""

    def __init__(self, metrics: Metrics, max_poll_gap_seconds: float) -> None:
        self._metrics = metrics
        self._max_poll_gap_seconds = max_poll_gap_seconds
        self._lock = threading.Lock()
        self._last_poll = time.monotonic()
        self._fatal_error: str | None = None
        self._model_loaded = False
        self._warmed_up = False
        self._in_group = False
        self._outages: set[str] = set()
        # Evaluated at each scrape, so the gauge follows conditions that change with
        # time alone, such as the gap since the last poll.
        metrics.ready.set_function(self._ready_value)

    def record_poll(self) -> None:
        with self._lock:
            self._last_poll = time.monotonic()
        self._metrics.last_poll.set_to_current_time()

    def set_fatal(self, reason: str) -> None:
        """Mark the worker as failed for good; `reason` starts with what failed (Kafka, the engine)."""
        with self._lock:
            self._fatal_error = reason

    def set_model_loaded(self) -> None:
        with self._lock:
            self._model_loaded = True

    def set_warmed_up(self) -> None:
        with self._lock:
            self._warmed_up = True

    def set_in_group(self, in_group: bool) -> None:
        with self._lock:
            self._in_group = in_group

    def set_outage(self, dependency: str, active: bool) -> None:
        """Mark an outage of `dependency` ("s3" or "kafka") as started or ended."""
        with self._lock:
            if active:
                self._outages.add(dependency)
            else:
                self._outages.discard(dependency)

    def has_outage(self, dependency: str) -> bool:
        with self._lock:
            return dependency in self._outages

    def liveness_problem(self) -> str | None:
        """Return why the worker is not alive, or None when it is."""
        with self._lock:
            if self._fatal_error is not None:
                return self._fatal_error
            gap = time.monotonic() - self._last_poll
            if gap > self._max_poll_gap_seconds:
                return f"no poll for {gap:.0f} s (limit {self._max_poll_gap_seconds:g} s)"
        return None

    def readiness_problem(self) -> str | None:
        """Return why the worker is not ready, or None when it is."""
        with self._lock:
            if self._fatal_error is not None:
                return self._fatal_error
            if not self._model_loaded:
                return "model not loaded"
            if not self._warmed_up:
                return "warm-up caption not done"
            if not self._in_group:
                return "consumer not in its group"
            # A loop that stopped polling (blocked in a call to an unresponsive broker) is not ready either.
            gap = time.monotonic() - self._last_poll
            if gap > self._max_poll_gap_seconds:
                return f"no poll for {gap:.0f} s (limit {self._max_poll_gap_seconds:g} s)"
            if self._outages:
                return "outage of " + ", ".join(sorted(self._outages))
        return None

    def _ready_value(self) -> float:
        return 0.0 if self.readiness_problem() else 1.0


class _Handler(BaseHTTPRequestHandler):
    server: _HealthHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send_check(self.server.state.liveness_problem())
        elif path == "/readyz":
            self._send_check(self.server.state.readiness_problem())
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send_check(self, problem: str | None) -> None:
        if problem is None:
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._send(503, problem.encode("utf-8") + b"\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by the base class
        # Probes arrive every few seconds; logging each one would drown the worker's own lines.
        pass


class _HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, state: HealthState) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.state = state


class HealthServer:
    """The HTTP server of /metrics, /healthz and /readyz, served from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, state: HealthState) -> None:
        self._server = _HealthHTTPServer((host, port), metrics, state)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)

    @property
    def port(self) -> int:
        """Return the bound port, which differs from the setting when that is 0."""
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        logger.info("health server started", extra=fields(address=self._server.server_address[0], port=self.port))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

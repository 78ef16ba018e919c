"""A misbehaving S3-like HTTP server on 127.0.0.1, for fetch tests that a real store cannot stage.

It serves path-style GET /bucket/key and HEAD /bucket. Each object may carry a plan:
a list of behaviours that successive GETs consume, one each, before the object is
served normally. A behaviour may also be set to repeat forever for one key, or for
a whole bucket (then HEAD /bucket fails too).

Behaviours: "slowdown" (503 SlowDown), "too_many" (429), "internal" (500 InternalError),
"forbidden" (403 AccessDenied), "short" (half the body, then the connection closes),
"held" (headers with a huge Content-Length, body held back until `release_held`),
"chunked" (chunked transfer encoding, no Content-Length).
"""

from __future__ import annotations

import collections
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELD_CONTENT_LENGTH = 512 * 1024 * 1024
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "too_many": (429, "TooManyRequests", "Too many requests."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}


class FlakyS3:
    """The server's objects, plans and counters; start() binds 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], bytes] = {}
        self._plans: dict[tuple[str, str], collections.deque[str]] = {}
        self._always: dict[tuple[str, str], str] = {}
        self._down_buckets: dict[str, str] = {}
        self.get_requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.body_bytes_sent: collections.Counter[tuple[str, str]] = collections.Counter()
        self.held_released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        handler = type("BoundHandler", (_Handler,), {"store": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.held_released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def put(self, bucket: str, key: str, data: bytes, plan: list[str] | None = None) -> None:
        with self._lock:
            self._objects[(bucket, key)] = data
            self._plans[(bucket, key)] = collections.deque(plan or [])

    def fail_always(self, bucket: str, key: str, behaviour: str) -> None:
        with self._lock:
            self._always[(bucket, key)] = behaviour

    def set_bucket_down(self, bucket: str, behaviour: str | None = "internal") -> None:
        """Make every request to the bucket fail with `behaviour`, or serve it again with None."""
        with self._lock:
            if behaviour is None:
                self._down_buckets.pop(bucket, None)
            else:
                self._down_buckets[bucket] = behaviour

    def release_held(self) -> None:
        self.held_released.set()

    def _next_behaviour(self, bucket: str, key: str) -> str:
        with self._lock:
            self.get_requests[(bucket, key)] += 1
            if bucket in self._down_buckets:
                return self._down_buckets[bucket]
            if (bucket, key) in self._always:
                return self._always[(bucket, key)]
            if (bucket, key) not in self._objects:
                return "missing"
            plan = self._plans[(bucket, key)]
            return plan.popleft() if plan else "ok"

    def _bucket_state(self, bucket: str) -> str:
        with self._lock:
            if bucket in self._down_buckets:
                return self._down_buckets[bucket]
            known = any(name == bucket for name, _ in self._objects)
            return "ok" if known else "missing"

    def _object(self, bucket: str, key: str) -> bytes:
        with self._lock:
            return self._objects[(bucket, key)]

    def _count_sent(self, bucket: str, key: str, size: int) -> None:
        with self._lock:
            self.body_bytes_sent[(bucket, key)] += size


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: FlakyS3

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - name fixed by http.server
        bucket, _ = self._bucket_and_key()
        state = self.store._bucket_state(bucket)
        if state == "ok":
            status = 200
        elif state == "missing":
            status = 404
        else:
            status = _ERRORS[state][0]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
        bucket, key = self._bucket_and_key()
        behaviour = self.store._next_behaviour(bucket, key)
        if behaviour in _ERRORS:
            self._send_error(*_ERRORS[behaviour])
        elif behaviour == "missing":
            self._send_error(404, "NoSuchKey", "The specified key does not exist.")
        elif behaviour == "short":
            self._send_short(bucket, key)
        elif behaviour == "held":
            self._send_held(bucket, key)
        elif behaviour == "chunked":
            self._send_chunked(bucket, key)
        else:
            self._send_object(bucket, key)

    def _bucket_and_key(self) -> tuple[str, str]:
        path = urllib.parse.urlsplit(self.path).path
        bucket, _, key = path.lstrip("/").partition("/")
        return urllib.parse.unquote(bucket), urllib.parse.unquote(key)

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>flaky</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_object_headers(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", '"flaky"')
        self.send_header("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_object(self, bucket: str, key: str) -> None:
        data = self.store._object(bucket, key)
        self._send_object_headers(len(data))
        self.wfile.write(data)
        self.store._count_sent(bucket, key, len(data))

    def _send_short(self, bucket: str, key: str) -> None:
        data = self.store._object(bucket, key)
        self._send_object_headers(len(data))
        half = data[: len(data) // 2]
        self.wfile.write(half)
        self.wfile.flush()
        self.store._count_sent(bucket, key, len(half))
        self._drop_connection()

    def _send_held(self, bucket: str, key: str) -> None:
        # The body is held back until the test has seen the fetch end, so any byte
        # counted before the release would have been requested by the client.
        self._send_object_headers(HELD_CONTENT_LENGTH)
        self.wfile.flush()
        self.store.held_released.wait(timeout=30)
        chunk = b"\0" * 65536
        try:
            for _ in range(HELD_CONTENT_LENGTH // len(chunk)):
                self.wfile.write(chunk)
                self.store._count_sent(bucket, key, len(chunk))
        except OSError:
            pass
        self._drop_connection()

    def _send_chunked(self, bucket: str, key: str) -> None:
        data = self.store._object(bucket, key)
        self._send_object_headers(None)
        try:
            for start in range(0, len(data), 65536):
                piece = data[start : start + 65536]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.store._count_sent(bucket, key, len(piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self._drop_connection()

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

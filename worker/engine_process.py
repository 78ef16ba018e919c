"""The caption engine in a child process, so that its pipeline steps do not hold the stream's GIL.

openvino-genai 2026.4.1 holds the GIL in `ContinuousBatchingPipeline.step()` and
`add_request()`. In one process, the engine thread then starves the threads that
poll Kafka, fetch and decode (docs/benchmarks.md). `EngineProcess` runs a
`CaptionEngine` in a child process and offers the same interface: `submit()`
returns a Future, and `free_slots()`, `stats()`, `warm_up()` and `close()` work
as the engine's do.

Parent and child exchange pickled tuples over two pipes:

- to the child: ("submit", id, pixels, prompt, options, submitted_at), ("cancel", id), ("close", timeout);
- to the parent: ("ready",), ("load_failed", message, is_model_error), ("result", id, result),
  ("failed", id, code, message, retryable), ("cancelled", id), ("stopped", id, reason),
  ("stats", figures) and last ("closed", figures).

The parent's calls never wait on the pipe: a sender thread writes to it, because an
image for a full-size model (2.4 MB) does not fit in a pipe's buffer, and a child that
hangs would block the writer. A reader thread takes the replies and also watches the
child: a child that reports nothing for STALL_SECONDS, or keeps a request past its
deadline, is killed.

The child ignores SIGINT and SIGTERM, because the parent decides when it stops. On
Linux the kernel kills it when the parent dies, even while it loads the model; it also
exits when its pipe from the parent closes. When the child dies, every pending future
fails with EngineStopped, and `failure` contains the reason.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from worker.engine import (
    CaptionEngine, EngineBase, GenerationOptions, ModelLoadError, check_pixels, check_prompt, observe_result,
    set_request_gauges,
)
from worker.errors import CaptionError, EngineFull, EngineStopped, ErrorCode
from worker.logs import configure_logging, fields
from worker.metrics import Metrics
from worker.settings import Settings

logger = logging.getLogger(__name__)

# How often the child reports its request counts and KV-cache usage for the gauges.
STATS_INTERVAL_SECONDS = 0.5

# Past close()'s timeout: time for the child's last engine step, its report and its exit.
CLOSE_MARGIN_SECONDS = 10.0
# How long close() waits for a child that it had to kill.
KILL_WAIT_SECONDS = 2.0
# A request that the child keeps this long past request-timeout-seconds means a stuck child.
OVERDUE_SECONDS = 15.0

# A child that sends nothing for this long is taken as hung and killed. It reports twice a
# second, except during a pipeline step, which holds the GIL. NOTE: this limit is an estimate.
# The tiny model's steps take milliseconds, and no full-size model's step has been measured.
STALL_SECONDS = 120.0
# How often the reader thread checks for a stalled child or an overdue request.
WATCH_INTERVAL_SECONDS = 1.0
# Linux prctl() option that sends the child a signal when its parent thread dies.
PR_SET_PDEATHSIG = 1


class EngineProcess(EngineBase):
    """A CaptionEngine in a child process, with the engine's thread-safe interface."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, inference_precision: str | None = None
    ) -> None:
        """Check the model directory; start() spawns the child, which loads the model."""
        super().__init__(settings, metrics, inference_precision)
        # Submitted and not yet reported by the child, with the monotonic time of submission; under _lock.
        self._pending: dict[int, tuple[Future, float]] = {}
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._last_report = 0.0
        self._request_ids = itertools.count()
        self._closing = False
        self._stats: dict[str, Any] = {}

        self._process: Any = None  # multiprocessing's SpawnProcess
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._reader: threading.Thread | None = None
        self._sender: threading.Thread | None = None

    # ------------------------------------------------------------ public interface

    def start(self) -> None:
        """Spawn the child and wait until it has loaded the model.

        Raises ModelLoadError when the child could not load the model or died while
        loading it, and RuntimeError when it failed otherwise. Call it from a thread that
        lives as long as the engine: on Linux the child is killed when that thread ends.
        """
        # Spawn, not fork: the parent already runs librdkafka and HTTP threads, which a fork would copy half-way.
        context = multiprocessing.get_context("spawn")
        from_child, child_end_out = context.Pipe(duplex=False)
        child_end_in, to_child = context.Pipe(duplex=False)
        self._process = context.Process(
            target=serve,
            args=(self._settings, self._inference_precision, child_end_in, child_end_out, os.getpid()),
            name="caption-engine",
            daemon=True,
        )
        started = time.monotonic()
        self._process.start()
        # Only the child may hold these ends, so that each side reads end of file when the other dies.
        child_end_in.close()
        child_end_out.close()
        self._to_child, self._from_child = to_child, from_child

        self._await_ready()
        logger.info(
            "caption engine process ready",
            extra=fields(pid=self._process.pid, seconds=round(time.monotonic() - started, 3)),
        )
        self._last_report = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="caption-engine-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_all, name="caption-engine-sender", daemon=True)
        self._sender.start()

    def submit(self, pixels: np.ndarray, prompt: str | None, options: GenerationOptions) -> Future:
        """Queue one image for the child and return a future of its CaptionResult; never blocks.

        Raises as CaptionEngine.submit() does, and EngineStopped once the child has died.
        """
        if self._to_child is None:
            raise RuntimeError("caption engine is not started: call start() first")
        pixels = check_pixels(pixels)
        check_prompt(self._settings, prompt)
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise EngineStopped(self._failure)
            if self._closing:
                raise RuntimeError("caption engine is closed")
            if len(self._pending) >= self._settings.max_queued_requests:
                raise EngineFull(f"{len(self._pending)} caption requests in flight, the maximum")
            request_id = next(self._request_ids)
            submitted_at = time.monotonic()
            self._pending[request_id] = (future, submitted_at)
        self._outbox.put(("submit", request_id, pixels, prompt, options, submitted_at))
        future.add_done_callback(functools.partial(self._on_future_done, request_id))
        return future

    def free_slots(self) -> int:
        """Return how many more requests submit() accepts now."""
        with self._lock:
            return max(0, self._settings.max_queued_requests - len(self._pending))

    def stats(self) -> dict[str, Any]:
        """Return the child's last reported counts and step metrics, with the parent's count in flight."""
        with self._lock:
            return {**self._stats, "in_flight": len(self._pending)}

    def close(self, timeout: float) -> None:
        """Stop the child, giving requests in flight up to `timeout` seconds to finish.

        Steps:
        1. stop admission: submit() raises RuntimeError from now on;
        2. request the child to close its engine, which finishes what it can within the
           timeout and fails the rest with a retryable generation_failed;
        3. wait for the child's last report, up to the timeout and a margin;
        4. join the child, and kill it if it is still alive.
        Steps 3 and 4 share one deadline, CLOSE_MARGIN_SECONDS after the timeout.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = len(self._pending)
        if self._process is None:
            return
        logger.info("caption engine process closing", extra=fields(in_flight=pending, timeout_seconds=timeout))

        self._outbox.put(("close", timeout))
        self._outbox.put(None)  # the sender thread stops after the close message

        deadline = time.monotonic() + timeout + CLOSE_MARGIN_SECONDS
        if self._reader is not None:
            self._reader.join(max(0.0, deadline - time.monotonic()))

        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.warning("caption engine process did not stop, killing it", extra=fields(pid=self._process.pid))
            self._process.kill()
            self._process.join(KILL_WAIT_SECONDS)
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                connection.close()
        logger.info("caption engine process stopped", extra=fields(exit_code=self._process.exitcode, **self.stats()))

    # ------------------------------------------------------------ parent's sender and reader threads

    def _send_all(self) -> None:
        """Write queued messages to the child until close() queues the end; runs in the sender thread."""
        assert self._to_child is not None
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._to_child.send(message)
            except OSError:
                return  # the child is gone, and the reader fails what is pending

    def _on_future_done(self, request_id: int, future: Future) -> None:
        # The child's request runs until a cancel message reaches it. The slot frees when
        # the child reports the request cancelled.
        if future.cancelled():
            self._outbox.put(("cancel", request_id))

    def _read(self) -> None:
        """Take the child's replies, and check on the child between them; runs in the reader thread."""
        assert self._from_child is not None
        next_watch = time.monotonic() + WATCH_INTERVAL_SECONDS
        try:
            while True:
                # A child that still reports can hold a request forever, so the check runs on a clock.
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCH_INTERVAL_SECONDS
                    self._watch()
                if not self._from_child.poll(WATCH_INTERVAL_SECONDS):
                    continue
                message = self._from_child.recv()
                self._last_report = time.monotonic()
                if message[0] == "closed":
                    with self._lock:
                        self._stats = message[1]
                    return
                self._handle(message)
        except (EOFError, OSError):
            self._child_gone()
        except Exception as error:  # noqa: BLE001 - pending futures must fail, not hang
            logger.exception("caption engine reader failed")
            self._child_gone(f"caption engine reader failed: {error!r}")

    def _watch(self) -> None:
        """Kill a child that has reported nothing for STALL_SECONDS or keeps a request past its deadline."""
        now = time.monotonic()
        with self._lock:
            if self._closing or self._failure is not None:
                return
            oldest = min((submitted for _, submitted in self._pending.values()), default=now)
        # The child fails a request at request-timeout-seconds itself, unless it is stuck.
        overdue = now - oldest - self._settings.request_timeout_seconds
        if now - self._last_report > STALL_SECONDS:
            reason = f"caption engine process sent nothing for {STALL_SECONDS:g} s"
        elif overdue > OVERDUE_SECONDS:
            reason = f"caption engine process kept a request {overdue:.0f} s past request-timeout-seconds"
        else:
            return
        logger.error("caption engine process is stuck, killing it", extra=fields(reason=reason, pid=self._process.pid))
        with self._lock:
            self._failure = reason
        self._process.kill()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "stats":
            figures = message[1]
            with self._lock:
                self._stats = figures
            if self._metrics is not None and "running" in figures:
                set_request_gauges(self._metrics, figures["running"], figures["waiting"], figures["kv_cache_usage"])
            return

        request_id = message[1]
        with self._lock:
            entry = self._pending.pop(request_id, None)
        if entry is None or not entry[0].set_running_or_notify_cancel():
            return
        future = entry[0]
        if kind == "result":
            if self._metrics is not None:
                observe_result(self._metrics, message[2])
            future.set_result(message[2])
        elif kind == "failed":
            _, _, code, text, retryable = message
            future.set_exception(CaptionError(ErrorCode(code), text, retryable=retryable))
        elif kind == "stopped":
            with self._lock:
                self._failure = self._failure or message[2]
            future.set_exception(EngineStopped(message[2]))
        else:
            future.set_exception(EngineStopped(f"caption engine process sent an unknown reply {kind!r}"))

    def _child_gone(self, reason: str | None = None) -> None:
        """Record why the child stopped and fail every pending future with EngineStopped."""
        self._process.join(1.0)
        reason = reason or f"caption engine process exited with code {self._process.exitcode}"
        with self._lock:
            # A reason found earlier, such as a stuck child that _watch() killed, explains more than the exit code.
            self._failure = reason = self._failure or reason
            pending = [future for future, _ in self._pending.values()]
            self._pending.clear()
            closing = self._closing
        # During close() the child may be killed on purpose; otherwise it died under the stream.
        log = logger.warning if closing else logger.error
        log("caption engine process stopped unexpectedly", extra=fields(reason=reason, pending=len(pending)))
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(reason))

    def _await_ready(self) -> None:
        assert self._from_child is not None
        try:
            message = self._from_child.recv()
            # The engine thread may report its figures before the child reports ready.
            while message[0] == "stats":
                message = self._from_child.recv()
        except EOFError:
            self._process.join(CLOSE_MARGIN_SECONDS)
            code = self._process.exitcode
            # A SIGKILL during the load can come from the kernel's out-of-memory killer.
            hint = "; killed, possibly for lack of memory: check the memory limit" if code == -signal.SIGKILL else ""
            raise ModelLoadError(
                f"caption engine process exited with code {code} while loading the model{hint}"
            ) from None
        if message[0] == "load_failed":
            _, text, model_error = message
            self._process.join(CLOSE_MARGIN_SECONDS)
            raise ModelLoadError(text) if model_error else RuntimeError(text)


# ------------------------------------------------------------ child process


def serve(
    settings: Settings, inference_precision: str | None, requests: Connection, replies: Connection, parent_pid: int
) -> None:
    """Run a CaptionEngine for the parent until it requests close or its pipe closes. Runs in the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    configure_logging(settings.log_level, settings.log_format)
    host = _EngineHost(requests, replies)
    if host.start(settings, inference_precision) and not host.serve():
        # The parent is gone. Exiting at once skips OpenVINO's teardown, which
        # reports the blocks of the requests it dropped as leaked.
        logging.shutdown()
        os._exit(0)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies, so a model load does not outlive it."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the child notices the end of its pipe once the model has loaded
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie the engine process to its parent", extra=fields(errno=ctypes.get_errno()))
    # The parent may have died before prctl(); this process then has a new parent already.
    if os.getppid() != parent_pid:
        os._exit(0)


class _EngineHost:
    """The child's side: turns messages from the parent into engine calls, and results into replies.

    The engine thread reads the pipe itself, between pipeline steps. A separate reader
    thread would need the GIL after every read, and the engine thread holds it for whole
    steps, so each message would wait a step or two. With 64 requests in flight, that
    halved the engine's throughput in a test.
    """

    def __init__(self, requests: Connection, replies: Connection) -> None:
        self._requests = requests
        self._replies = replies
        self._send_lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        # Set by the engine thread when the parent requests close (with its timeout) or is gone (None).
        self._close_requested = threading.Event()
        self._close_timeout: float | None = None
        self._next_report = 0.0
        self._engine: _HostedEngine | None = None

    def start(self, settings: Settings, inference_precision: str | None) -> bool:
        """Load the model and report ready, or report why not and return False."""
        # The parent bounds the requests in flight. A slot that the engine has just resolved
        # is released a moment after its reply is sent, so the engine gets room to spare.
        engine_settings = settings.model_copy(update={"max_queued_requests": 2 * settings.max_queued_requests})
        try:
            self._engine = _HostedEngine(self, engine_settings, inference_precision)
            self._engine.start()
        except ModelLoadError as error:
            self._send(("load_failed", str(error), True))
            return False
        except Exception as error:  # noqa: BLE001 - the parent reports it and exits with the startup code
            logger.exception("caption engine could not start")
            self._send(("load_failed", f"caption engine could not start: {error!r}", False))
            return False
        self._send(("ready",))
        return True

    def serve(self) -> bool:
        """Wait until the parent requests close or is gone, then close the engine.

        Returns True after a requested close, and False when the parent is gone.
        """
        assert self._engine is not None
        self._close_requested.wait()
        if self._close_timeout is None:
            logger.warning("parent process gone, stopping the caption engine")
            self._engine.close(0.0)
            return False
        self._engine.close(self._close_timeout)
        self._send(("closed", self._engine.stats()))
        return True

    # ------------------------------------------------------------ in the engine thread

    def take_messages(self) -> None:
        """Handle every message waiting in the pipe, and report the engine's figures when due."""
        assert self._engine is not None
        try:
            while not self._close_requested.is_set() and self._requests.poll(0):
                self._handle(self._requests.recv())
        except (EOFError, OSError):
            self._close_requested.set()
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + STATS_INTERVAL_SECONDS
            self._send(("stats", self._engine.stats()))

    def wait_for_message(self, timeout: float) -> None:
        if not self._close_requested.is_set():
            try:
                self._requests.poll(timeout)
            except (EOFError, OSError):
                self._close_requested.set()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(*message[1:])
        elif kind == "cancel":
            future = self._futures.get(message[1])
            if future is not None:
                future.cancel()
        elif kind == "close":
            self._close_timeout = message[1]
            self._close_requested.set()

    def _submit(
        self, request_id: int, pixels: np.ndarray, prompt: str | None, options: GenerationOptions, submitted_at: float
    ) -> None:
        assert self._engine is not None
        try:
            # The deadline runs from the parent's submit(), so time spent in the pipe counts too.
            future = self._engine.submit(pixels, prompt, options, submitted_at=submitted_at)
        except CaptionError as error:
            self._send(("failed", request_id, error.code.value, error.message, error.retryable))
            return
        except Exception as error:  # noqa: BLE001 - one bad request fails alone
            logger.exception("caption request rejected", extra=fields(request_id=request_id))
            self._send(("failed", request_id, ErrorCode.GENERATION_FAILED.value, f"invalid request: {error}", False))
            return
        self._futures[request_id] = future
        future.add_done_callback(functools.partial(self._reply, request_id))

    def _reply(self, request_id: int, future: Future) -> None:
        # Runs in the engine thread when a request ends.
        self._futures.pop(request_id, None)
        if future.cancelled():
            self._send(("cancelled", request_id))
            return
        error = future.exception()
        if error is None:
            self._send(("result", request_id, future.result()))
        elif isinstance(error, CaptionError):
            self._send(("failed", request_id, error.code.value, error.message, error.retryable))
        else:
            self._send(("stopped", request_id, str(error)))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._replies.send(message)
        except OSError:
            pass  # the parent is gone; the engine thread reads the end of its pipe and stops


class _HostedEngine(CaptionEngine):
    """A CaptionEngine whose thread also receives the parent's messages, between pipeline steps."""

    def __init__(self, host: _EngineHost, settings: Settings, inference_precision: str | None) -> None:
        super().__init__(settings, None, inference_precision)
        self._host = host

    def _take_input(self) -> None:
        self._host.take_messages()

    def _wait_for_input(self, timeout: float) -> None:
        self._host.wait_for_message(timeout)

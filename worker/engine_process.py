"""The caption engine in a child process, so that its pipeline steps do not hold the stream's GIL.

openvino-genai 2026.4.1 holds the GIL in `ContinuousBatchingPipeline.step()` and
`add_request()`. In one process, the engine thread then starves the threads that
poll Kafka, fetch and decode (docs/benchmarks.md). `EngineProcess` runs a
`CaptionEngine` in a child process and offers the same interface: `submit()`
returns a Future, and `free_slots()`, `stats()`, `warm_up()` and `close()` work
as the engine's do.

Parent and child exchange pickled tuples over two pipes:

- to the child: ("submit", id, pixels, prompt, options), ("cancel", id), ("close", timeout);
- to the parent: ("ready",), ("load_failed", message, is_model_error), ("result", id, result),
  ("failed", id, code, message, retryable), ("cancelled", id), ("stopped", id, reason),
  ("stats", figures) and last ("closed", figures).

The child ignores SIGINT and SIGTERM, because the parent decides when it stops, and
it exits when its pipe from the parent closes, so a killed parent takes it along.
When the child dies, every pending future fails with EngineStopped, and `failure`
contains the reason.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import signal
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
CLOSE_MARGIN_SECONDS = 15.0


class EngineProcess(EngineBase):
    """A CaptionEngine in a child process, with the engine's thread-safe interface."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, inference_precision: str | None = None
    ) -> None:
        """Check the model directory; start() spawns the child, which loads the model."""
        super().__init__(settings, metrics, inference_precision)
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}  # submitted and not yet reported by the child, under _lock
        self._request_ids = itertools.count()
        self._closing = False
        self._stats: dict[str, Any] = {}

        self._process: Any = None  # multiprocessing's SpawnProcess
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------ public interface

    def start(self) -> None:
        """Spawn the child and wait until it has loaded the model.

        Raises ModelLoadError when the child could not load the model, and
        RuntimeError when it failed otherwise or died while loading.
        """
        # Spawn, not fork: the parent already runs librdkafka and HTTP threads, which a fork would copy half-way.
        context = multiprocessing.get_context("spawn")
        from_child, child_end_out = context.Pipe(duplex=False)
        child_end_in, to_child = context.Pipe(duplex=False)
        self._process = context.Process(
            target=serve,
            args=(self._settings, self._inference_precision, child_end_in, child_end_out),
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
        self._reader = threading.Thread(target=self._read, name="caption-engine-reader", daemon=True)
        self._reader.start()

    def submit(self, pixels: np.ndarray, prompt: str | None, options: GenerationOptions) -> Future:
        """Send one image to the child and return a future of its CaptionResult.

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
            self._pending[request_id] = future
        try:
            self._send(("submit", request_id, pixels, prompt, options))
        except OSError as error:
            with self._lock:
                self._pending.pop(request_id, None)
            raise EngineStopped(f"caption engine process is gone: {error}") from None
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
        2. ask the child to close its engine, which finishes what it can within the
           timeout and fails the rest with a retryable generation_failed;
        3. wait for the child's last report, up to the timeout and a margin;
        4. join the child, and kill it if it is still alive.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = len(self._pending)
        if self._process is None:
            return
        logger.info("caption engine process closing", extra=fields(in_flight=pending, timeout_seconds=timeout))

        try:
            self._send(("close", timeout))
        except OSError:
            pass  # the child is already gone; the reader has failed what was pending

        if self._reader is not None:
            self._reader.join(timeout + CLOSE_MARGIN_SECONDS)

        self._process.join(CLOSE_MARGIN_SECONDS)
        if self._process.is_alive():
            logger.warning("caption engine process did not stop, killing it", extra=fields(pid=self._process.pid))
            self._process.kill()
            self._process.join(CLOSE_MARGIN_SECONDS)
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                connection.close()
        logger.info("caption engine process stopped", extra=fields(exit_code=self._process.exitcode, **self.stats()))

    # ------------------------------------------------------------ parent's reader thread

    def _send(self, message: tuple) -> None:
        assert self._to_child is not None
        with self._send_lock:
            self._to_child.send(message)

    def _on_future_done(self, request_id: int, future: Future) -> None:
        # The child's request goes on until told; its slot frees when the child reports it cancelled.
        if future.cancelled():
            try:
                self._send(("cancel", request_id))
            except OSError:
                pass

    def _read(self) -> None:
        assert self._from_child is not None
        try:
            while True:
                message = self._from_child.recv()
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
            future = self._pending.pop(request_id, None)
        if future is None or not future.set_running_or_notify_cancel():
            return
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
            self._failure = self._failure or reason
            pending = list(self._pending.values())
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
        except EOFError:
            self._process.join(CLOSE_MARGIN_SECONDS)
            raise RuntimeError(
                f"caption engine process exited with code {self._process.exitcode} while loading the model"
            ) from None
        if message[0] == "load_failed":
            _, text, model_error = message
            self._process.join(CLOSE_MARGIN_SECONDS)
            raise ModelLoadError(text) if model_error else RuntimeError(text)


# ------------------------------------------------------------ child process


def serve(settings: Settings, inference_precision: str | None, requests: Connection, replies: Connection) -> None:
    """Run a CaptionEngine for the parent until it requests close or its pipe closes. Runs in the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    host = _EngineHost(replies)
    if host.start(settings, inference_precision):
        host.serve(requests)


class _EngineHost:
    """The child's side: turns messages from the parent into engine calls, and results into replies."""

    def __init__(self, replies: Connection) -> None:
        self._replies = replies
        self._send_lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._stopped = threading.Event()
        self._engine: CaptionEngine | None = None

    def start(self, settings: Settings, inference_precision: str | None) -> bool:
        """Load the model and report ready, or report why not and return False."""
        # The parent bounds the requests in flight. A slot that the engine has just resolved
        # is released a moment after its reply is sent, so the engine gets room to spare.
        engine_settings = settings.model_copy(update={"max_queued_requests": 2 * settings.max_queued_requests})
        try:
            self._engine = CaptionEngine(engine_settings, None, inference_precision)
            self._engine.start()
        except ModelLoadError as error:
            self._send(("load_failed", str(error), True))
            return False
        except Exception as error:  # noqa: BLE001 - the parent reports it and exits with the startup code
            logger.exception("caption engine could not start")
            self._send(("load_failed", f"caption engine could not start: {error!r}", False))
            return False
        self._send(("ready",))
        threading.Thread(target=self._report_stats, name="caption-engine-stats", daemon=True).start()
        return True

    def serve(self, requests: Connection) -> None:
        assert self._engine is not None
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):
                logger.warning("parent process gone, stopping the caption engine")
                self._stopped.set()
                self._engine.close(0.0)
                return
            kind = message[0]
            if kind == "submit":
                self._submit(*message[1:])
            elif kind == "cancel":
                future = self._futures.get(message[1])
                if future is not None:
                    future.cancel()
            elif kind == "close":
                self._stopped.set()
                self._engine.close(message[1])
                self._send(("closed", self._engine.stats()))
                return

    def _submit(self, request_id: int, pixels: np.ndarray, prompt: str | None, options: GenerationOptions) -> None:
        assert self._engine is not None
        try:
            future = self._engine.submit(pixels, prompt, options)
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

    def _report_stats(self) -> None:
        assert self._engine is not None
        while not self._stopped.wait(STATS_INTERVAL_SECONDS):
            self._send(("stats", self._engine.stats()))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._replies.send(message)
        except OSError:
            pass  # the parent is gone, so serve() reads the end of its pipe and stops

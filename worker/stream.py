"""The streaming worker, `caption-worker run`: consume, fetch, caption, publish, commit.

The path of one message, top to bottom in this file:

1. poll: the consumer returns messages, which wait in a backlog until there is room (`_take_message`);
2. parse: `events.parse_message` turns it into image requests, failures and skip reasons;
3. fetch and decode each image in the fetch thread pool (`_fetch_and_decode`);
4. caption: `engine.submit` queues the pixels in the continuous-batching engine;
5. build the output record, or an error record at any failing step;
6. produce: the delivery callback marks the image done, and an offset is done when all its images are;
7. checkpoint: commit each partition up to its first offset that is not done.

In exactly-once mode, step 6 only keeps the records, and the checkpoint produces
them in a Kafka transaction together with the offsets.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker import __version__
from worker.cli import (
    EXIT_DRAIN_TIMEOUT, EXIT_ENGINE_STOPPED, EXIT_FAILURE, EXIT_KAFKA_FATAL, EXIT_OK, EXIT_SIGNAL, EXIT_STARTUP,
    EXIT_USAGE,
)
from worker.engine import EngineBase, GenerationOptions, ModelLoadError
from worker.engine_process import EngineProcess
from worker.errors import CaptionError, EngineFull, EngineStopped, ErrorCode, TransientError
from worker.events import parse_message
from worker.fetching import Fetcher
from worker.health import HealthServer, HealthState
from worker.images import DecodedImage, ImageLimits, decode_image
from worker.logs import KafkaClientLogger, RepeatLimiter, fields
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.pipeline import MessageWork, PartitionWork, TopicPartitionKey, WorkItem
from worker.publishing import (
    OutboundRecord, Publisher, SourceMessage, build_error_record, build_output_record, transactional_id,
)
from worker.settings import Settings, load_command_settings

logger = logging.getLogger(__name__)

# Poll timeouts: short while images are in flight, so completed work is picked up quickly.
BUSY_POLL_SECONDS = 0.02
IDLE_POLL_SECONDS = 0.5
MAX_MESSAGES_PER_POLL = 100
# Bounds of the shutdown steps after the drain, and of Kafka calls at the checkpoints.
FLUSH_TIMEOUT_SECONDS = 15.0
COMMIT_TIMEOUT_SECONDS = 15.0
# An asynchronous commit without a result for this long no longer holds back the next one.
# librdkafka fails a request after socket.timeout.ms (60 s by default), well before this.
ASYNC_COMMIT_LIMIT_SECONDS = 120.0
CLOSE_TIMEOUT_SECONDS = 15.0
TRANSACTION_TIMEOUT_SECONDS = 30.0
STATISTICS_INTERVAL_MS = 10_000

# Commit errors that a rebalance causes; the next owner commits, so they are not fatal.
REBALANCE_COMMIT_ERRORS = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._NO_OFFSET,
        KafkaError._STATE,
    }
)

# Tries of one image that fails with a retryable caption error, before it is dead-lettered.
CAPTION_ATTEMPTS = 3

FETCHED = "fetched"
CAPTIONED = "captioned"


def consumer_config(
    settings: Settings,
    *,
    error_cb: Callable[[KafkaError], None] | None = None,
    stats_cb: Callable[[str], None] | None = None,
    commit_cb: Callable[[KafkaError | None, list[TopicPartition]], None] | None = None,
) -> dict[str, Any]:
    """Return the consumer's librdkafka configuration.

    --kafka-option may change the defaults (the assignment strategy, for one) but
    not the offset handling, because offsets are stored and committed only at checkpoints.
    """
    config: dict[str, Any] = {
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": "earliest",
        "statistics.interval.ms": STATISTICS_INTERVAL_MS,
    }
    config.update(settings.kafka_common_config())
    config.update(
        {
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    if settings.delivery == "exactly-once":
        config["isolation.level"] = "read_committed"
    if error_cb is not None:
        config["error_cb"] = error_cb
    if stats_cb is not None:
        config["stats_cb"] = stats_cb
    if commit_cb is not None:
        config["on_commit"] = commit_cb
    # librdkafka's own log lines go through the worker's log format; consume() serves them.
    config["logger"] = KafkaClientLogger()
    return config


def _topic_partitions(positions: dict[TopicPartitionKey, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]


def _keys(partitions: Iterable[TopicPartition]) -> list[TopicPartitionKey]:
    return [(tp.topic, tp.partition) for tp in partitions]


def _run_bounded(target: Callable[[], object], timeout: float, name: str) -> bool:
    """Run `target` in a daemon thread, wait up to `timeout` seconds, and return False if it is still running.

    A Kafka call that hangs because a broker stopped responding then cannot keep the process alive.
    """
    errors: list[BaseException] = []

    def call() -> None:
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported to the caller's thread below
            errors.append(error)

    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("step timed out", extra=fields(step=name, timeout_seconds=timeout))
        return False
    if errors:
        raise errors[0]
    return True


class Worker:
    """The stream loop. `run()` returns an exit code, and `stop()` may be called from a signal handler."""

    def __init__(
        self, settings: Settings, metrics: Metrics, health: HealthState, engine: EngineBase,
        fetcher: Fetcher,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.engine = engine
        self.fetcher = fetcher
        self.exactly_once = settings.delivery == "exactly-once"
        self.options = GenerationOptions.from_settings(settings)
        self.limits = ImageLimits.from_settings(settings, engine.image_side)
        self.stop_event = stop_event or threading.Event()
        # Outages repeat the same warnings many times a second; metrics count each one.
        self.log_limiter = RepeatLimiter()

        config = consumer_config(
            settings, error_cb=self._on_kafka_error, stats_cb=self._on_stats, commit_cb=self._on_commit
        )
        self.consumer = Consumer(config)
        # Without a committed offset, lag counts from the partition's first offset only if consumption starts there.
        self.starts_at_earliest = config.get("auto.offset.reset") in ("earliest", "smallest", "beginning")
        self.publisher = Publisher(settings, error_cb=self._on_kafka_error)
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="fetch")
        self.tracker = OffsetTracker()

        self.partitions: dict[TopicPartitionKey, PartitionWork] = {}
        self.paused: set[TopicPartitionKey] = set()
        # Newly assigned partitions: librdkafka keeps a pause across revoke and re-assign, so
        # the next backpressure step resumes or pauses each of them explicitly.
        self.newly_assigned: set[TopicPartitionKey] = set()
        self.completed: queue.SimpleQueue[tuple[str, WorkItem, Future]] = queue.SimpleQueue()
        self.waiting: deque[WorkItem] = deque()  # decoded, waiting for room in the engine
        # Consumed messages that wait for room. librdkafka drops a paused partition's prefetched
        # messages and fetches them again on resume, which took 0.1 to 1 s per resume in
        # `bench stream`, so the loop pauses for lack of room only when this backlog is full.
        self.backlog: deque[Message] = deque()
        self.fetch_retries: list[WorkItem] = []  # fetches that met an unhealthy store
        self.retried_fetches: set[WorkItem] = set()  # retries of such fetches, in the fetch pool
        # Monotonic time when the S3 outage began, or None. It ends only when the store responds after this time.
        self.s3_outage_since: float | None = None
        self.redeliveries: list[WorkItem] = []  # records whose delivery failed
        self.brokers_down = False
        self.fatal_error: KafkaError | None = None
        # When the asynchronous commit that waits for its result was sent (monotonic), or None.
        self.async_commit_since: float | None = None
        self.closing = False
        self.next_checkpoint = 0.0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to stop taking messages and shut down in order."""
        self.stop_event.set()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def close_unstarted(self) -> None:
        """Close the clients of a worker whose run() never started, because startup failed after they were built."""
        self.closing = True
        self.fetch_pool.shutdown(wait=False)
        _run_bounded(self.consumer.close, CLOSE_TIMEOUT_SECONDS, "consumer-close")

    def run(self) -> int:
        """Subscribe, loop over poll, process and checkpoint until stopped, then shut down."""
        if self.exactly_once:
            try:
                self.publisher.producer.init_transactions(TRANSACTION_TIMEOUT_SECONDS)
            except KafkaException as exc:
                logger.error("could not initialize Kafka transactions", extra=fields(error=exc.args[0].str()))
                return EXIT_KAFKA_FATAL if exc.args[0].fatal() else EXIT_STARTUP
        self.consumer.subscribe(
            [self.settings.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        values = dict(topic=self.settings.input_topic, group=self.settings.group_id, delivery=self.settings.delivery)
        if self.exactly_once:
            values["transactional_id"] = transactional_id(self.settings)
        logger.info("worker started", extra=fields(**values))
        self.next_checkpoint = time.monotonic() + self.settings.commit_interval_seconds

        while not self.stopping and self.fatal_error is None and self.engine.failure is None:
            self._poll()
            self._process_completed()
            self._apply_backpressure()
            self._checkpoint_if_due()

        return self._shutdown()

    def _shutdown(self) -> int:
        """Shut down in order, each step bounded, and return the exit code.

        1. Stop intake: pause every assigned partition and drop the backlog. Backlog messages
           were never started, so no commit passes them, and they are consumed again later.
        2. Drain: finish in-flight images until none is left or drain_timeout_seconds pass,
           polling the consumer so that the worker stays in its group. A stopped engine
           can finish nothing, so the drain ends at once.
        3. Flush the producer.
        4. Checkpoint: commit what is done.
        5. Close the fetch pool and the consumer. The consumer leaves the group in a daemon
           thread joined with a timeout, so a hung close cannot keep the pod alive.
        After a fatal Kafka error, steps 2 to 4 are skipped because the client can do nothing more.
        """
        logger.info("shutdown: stopping intake", extra=fields(in_flight=self._in_flight()))
        if self.engine.failure is not None:
            self.health.set_fatal(f"caption engine stopped: {self.engine.failure}")
        self._apply_backpressure()
        self.backlog.clear()

        drained = True
        if self.fatal_error is None:
            drained = self._drain(time.monotonic() + self.settings.drain_timeout_seconds)

            remaining = self.publisher.flush(FLUSH_TIMEOUT_SECONDS)
            self._serve_deliveries()
            if remaining:
                logger.warning("shutdown: producer flush timed out", extra=fields(unacknowledged=remaining))

            logger.info("shutdown: committing")
            self._checkpoint(final=True)

        logger.info("shutdown: closing consumer")
        self.closing = True
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        _run_bounded(self.consumer.close, CLOSE_TIMEOUT_SECONDS, "consumer-close")

        if self.fatal_error is not None:
            logger.error("stopped after a fatal Kafka error", extra=fields(error=self.fatal_error.str()))
            return EXIT_KAFKA_FATAL
        if self.engine.failure is not None:
            logger.error("stopped because the caption engine stopped; unfinished offsets stay uncommitted",
                         extra=fields(error=self.engine.failure))
            return EXIT_ENGINE_STOPPED
        if not drained:
            logger.warning("stopped with in-flight images left; their offsets stay uncommitted")
            return EXIT_DRAIN_TIMEOUT
        logger.info("stopped")
        return EXIT_OK

    def _drain(self, deadline: float) -> bool:
        """Finish in-flight images without taking new ones, and return False if the deadline passed first."""
        logger.info("shutdown: draining", extra=fields(in_flight=self._in_flight(),
                                                        timeout_seconds=self.settings.drain_timeout_seconds))
        while self._unfinished(self.partitions.values()) and time.monotonic() < deadline:
            if self.fatal_error is not None or self.engine.failure is not None:
                return False
            self._poll(intake=False)
            self._process_completed()
            self._apply_backpressure()
        return not self._unfinished(self.partitions.values())

    # ------------------------------------------------------------------ loop steps

    def _poll(self, *, intake: bool = True) -> None:
        """Poll the consumer, which also runs rebalance, error and statistics callbacks, and take its messages."""
        if intake:
            self._take_backlog()
        room = self._backlog_limit() - len(self.backlog)
        timeout = BUSY_POLL_SECONDS if self._in_flight() or self.publisher.pending() else IDLE_POLL_SECONDS
        try:
            messages = self.consumer.consume(num_messages=max(1, min(room, MAX_MESSAGES_PER_POLL)), timeout=timeout)
        except KafkaException as exc:
            self._on_kafka_error(exc.args[0])
            return
        self.health.record_poll()
        for message in messages:
            if message.error() is not None:
                self._on_kafka_error(message.error())
            elif intake:
                self.backlog.append(message)
            else:
                # A message fetched before the pause is put back by seeking to it, so it is read again later.
                self._rewind_to(message)
        if intake:
            self._take_backlog()

    def _take_backlog(self) -> None:
        """Start backlog messages in the order consumed while there is room for their images."""
        while self.backlog and self._has_room():
            self._take_message(self.backlog.popleft())

    def _process_completed(self) -> None:
        """Move finished work on: fetched images to the engine, captions to the producer, then retries."""
        self._serve_deliveries()
        while True:
            try:
                stage, item, future = self.completed.get_nowait()
            except queue.Empty:
                break
            if item.partition.revoked:
                continue
            if stage == FETCHED:
                self._after_fetch(item, future)
            else:
                self._after_caption(item, future)
        self._end_s3_outage_if_store_responded()
        self._retry_due_fetches()
        self._submit_waiting()
        self._redeliver_due()
        self._update_outages()

    def _checkpoint_if_due(self) -> None:
        due = time.monotonic() >= self.next_checkpoint
        # With transactions, built records count as in flight until a checkpoint sends them.
        if self.exactly_once and self._in_flight() >= self.settings.max_in_flight:
            due = due or any(partition.outbox for partition in self.partitions.values())
        if due and self.health.has_outage("kafka"):
            # A synchronous commit would block the loop, and its polls, until the coordinator
            # is back or the session times out. The offsets wait for the first checkpoint after the outage.
            self.next_checkpoint = time.monotonic() + self.settings.commit_interval_seconds
            return
        if due:
            self._checkpoint(wait=False)

    # ------------------------------------------------------------------ one message

    def _take_message(self, message: Message) -> None:
        source = SourceMessage.from_message(message)
        tp = (source.topic, source.partition)
        partition = self.partitions.get(tp)
        if partition is None:
            logger.warning("message of an unassigned partition ignored",
                           extra=fields(topic=source.topic, partition=source.partition, offset=source.offset))
            return
        position = self.tracker.position(tp)
        if position is not None and source.offset < position and not self.tracker.is_open(tp, source.offset):
            logger.warning("message before the committed position ignored",
                           extra=fields(topic=source.topic, partition=source.partition, offset=source.offset))
            return

        self.brokers_down = False
        work = MessageWork(source, partition)
        items = self._parse(work)
        work.parts = len(items)
        logger.debug("message received", extra=fields(topic=source.topic, partition=source.partition,
                                                       offset=source.offset, images=len(items)))
        self.tracker.add(tp, source.offset, len(items))
        if not items:
            self._message_done(work)
        for item in items:
            partition.items.add(item)
            if item.error is not None:
                self._fail(item, item.error)
            else:
                self._start_fetch(item)
        self._update_in_flight()

    def _parse(self, work: MessageWork) -> list[WorkItem]:
        source = work.source
        default_id = f"{source.topic}-{source.partition}-{source.offset}"
        try:
            parsed = parse_message(source.value, default_id=default_id, settings=self.settings)
        except CaptionError as error:
            return [WorkItem(work, None, error=error)]
        for reason in parsed.skipped:
            self.metrics.skipped.labels(reason=reason).inc()
        items = [
            WorkItem(work, None, error=failure.error, failed_id=failure.id, failed_image=failure.image)
            for failure in parsed.failures
        ]
        items.extend(WorkItem(work, request) for request in parsed.images)
        return items

    def _start_fetch(self, item: WorkItem) -> None:
        future = self.fetch_pool.submit(self._fetch_and_decode, item)
        future.add_done_callback(functools.partial(self._on_future_done, FETCHED, item))

    def _fetch_and_decode(self, item: WorkItem) -> DecodedImage:
        """Download and decode one image. Runs in a fetch thread."""
        assert item.request is not None
        fetched = self.fetcher.fetch(item.request.image)
        item.attempts += fetched.attempts
        item.fetch_seconds = fetched.fetch_seconds
        decoded = decode_image(fetched.data, self.limits)
        item.decode_seconds = decoded.decode_seconds
        return decoded

    def _on_future_done(self, stage: str, item: WorkItem, future: Future) -> None:
        # Runs in a fetch or engine thread: hand the result to the loop's thread.
        self.completed.put((stage, item, future))

    def _after_fetch(self, item: WorkItem, future: Future) -> None:
        self.retried_fetches.discard(item)
        try:
            item.decoded = future.result()
        except TransientError as error:
            if self.s3_outage_since is None:
                self.s3_outage_since = time.monotonic()
            delay = item.schedule_retry()
            self.fetch_retries.append(item)
            self.log_limiter.log(logger, logging.WARNING, "fetch failed on an unhealthy store, will retry",
                                 **self._item_values(item, error=str(error), retry_in_seconds=round(delay, 1)))
            return
        except CaptionError as error:
            self._fail(item, error)
            return
        except Exception as error:  # noqa: BLE001 - one image must not stop the stream
            logger.exception("fetch or decode failed unexpectedly", extra=self._item_fields(item))
            self._fail(item, CaptionError(ErrorCode.FETCH_FAILED, f"unexpected error: {error!r}", retryable=True))
            return
        self.metrics.decode.observe(item.decode_seconds)
        self.waiting.append(item)

    def _submit_waiting(self) -> None:
        """Submit decoded images to the engine in arrival order until it is full."""
        while self.waiting:
            item = self.waiting[0]
            if item.partition.revoked:
                self.waiting.popleft()
                continue
            assert item.request is not None and item.decoded is not None
            options = self.options
            if item.request.max_new_tokens is not None:
                options = options.replace(max_new_tokens=item.request.max_new_tokens)
            try:
                future = self.engine.submit(item.decoded.pixels, item.request.prompt, options)
            except (EngineFull, EngineStopped):
                return
            except CaptionError as error:
                self.waiting.popleft()
                self._fail(item, error)
                continue
            self.waiting.popleft()
            item.decoded = None  # the engine keeps its own reference to the pixels
            item.caption = future
            future.add_done_callback(functools.partial(self._on_future_done, CAPTIONED, item))

    def _after_caption(self, item: WorkItem, future: Future) -> None:
        item.caption = None
        try:
            result = future.result()
        except CaptionError as error:
            if error.retryable and item.caption_failures + 1 < CAPTION_ATTEMPTS:
                # A timeout or a full KV cache points at the engine's load rather than at the image.
                item.caption_failures += 1
                self.log_limiter.log(logger, logging.WARNING, "caption failed, will fetch and caption again",
                                     repeat_key=("caption retry", error.code.value),
                                     **self._item_values(item, error=error.message, failures=item.caption_failures))
                self._start_fetch(item)
                return
            self._fail(item, error)
            return
        except EngineStopped:
            # Not the image's fault: the loop stops, and the offset stays uncommitted for the next owner.
            return
        except Exception as error:  # noqa: BLE001 - one image must not stop the stream
            logger.exception("caption failed unexpectedly", extra=self._item_fields(item))
            self._fail(item, CaptionError(ErrorCode.GENERATION_FAILED, f"unexpected error: {error!r}"))
            return

        assert item.request is not None
        timings = {
            "fetch": item.fetch_seconds,
            "decode": item.decode_seconds,
            "queue": result.queue_seconds,
            "time_to_first_token": result.time_to_first_token_seconds,
            "generation": result.generation_seconds,
            "total": time.monotonic() - item.message.received_at,
        }
        try:
            record = build_output_record(
                self.settings, item.message.source, item.request, result, model=self.engine.model_name, timings=timings
            )
        except CaptionError as error:
            self._fail(item, error)
            return
        logger.debug("image captioned", extra=self._item_fields(item, tokens=result.generated_tokens))
        self._send(item, record)

    def _fail(self, item: WorkItem, error: CaptionError) -> None:
        """Dead-letter one image or message with the error's code."""
        item.error = error
        logger.warning("message failed", extra=self._item_fields(item, code=error.code.value, error=error.message))
        record = build_error_record(
            self.settings, item.message.source, error,
            request_id=item.request_id, image_uri=item.image_uri, attempts=max(item.attempts, 1),
        )
        self._send(item, record)

    def _send(self, item: WorkItem, record: OutboundRecord) -> None:
        """Produce the record now (at-least-once), or keep it for the next transaction (exactly-once)."""
        item.record = record
        if not self.exactly_once:
            self.publisher.produce(record, functools.partial(self._on_delivered, item))
            return
        message = item.message
        message.finished.append(item)
        message.dead_lettered = message.dead_lettered or item.error is not None
        if self.tracker.finish_part(message.tp, message.offset):
            item.partition.outbox[message.offset] = message
            self._message_done(message)

    # ------------------------------------------------------------------ deliveries

    def _serve_deliveries(self) -> None:
        self.publisher.poll(0)

    def _on_delivered(self, item: WorkItem, err: KafkaError | None) -> None:
        """Mark an acknowledged record's image done, or schedule a failed delivery again (at-least-once)."""
        if item.partition.revoked:
            return
        if err is not None:
            self._on_delivery_failed(item, err)
            return
        self.brokers_down = False
        self._count_delivery(item)
        item.partition.items.discard(item)
        message = item.message
        message.dead_lettered = message.dead_lettered or item.error is not None
        if self.tracker.finish_part(message.tp, message.offset):
            self._message_done(message)
        self._update_in_flight()

    def _on_delivery_failed(self, item: WorkItem, err: KafkaError) -> None:
        assert item.record is not None
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and item.error is None:
            error = CaptionError(ErrorCode.OUTPUT_TOO_LARGE, f"broker rejected the output record: {err.str()}")
            self._fail(item, error)
            return
        # An unreachable broker is no reason to dead-letter or drop a record, so its offset waits.
        delay = item.schedule_retry()
        self.redeliveries.append(item)
        self.log_limiter.log(logger, logging.WARNING, "delivery failed, will produce again",
                             repeat_key=("delivery failed", err.name()),
                             **self._item_values(item, output_topic=item.record.topic, error=err.str(),
                                                 code=err.name(), retry_in_seconds=round(delay, 1)))

    def _on_delivered_in_transaction(self, item: WorkItem, err: KafkaError | None) -> None:
        # A failed delivery fails commit_transaction, which aborts and rewinds.
        if err is None:
            self._count_delivery(item)

    def _count_delivery(self, item: WorkItem) -> None:
        if item.error is not None:
            self.metrics.failures.labels(code=item.error.code.value).inc()
        else:
            self.metrics.captions.inc()
        timestamp_ms = item.message.source.timestamp_ms
        if timestamp_ms is not None:
            self.metrics.end_to_end.observe(max(0.0, time.time() - timestamp_ms / 1000))

    def _message_done(self, message: MessageWork) -> None:
        if message.dead_lettered:
            outcome = "dead_lettered"
        elif message.parts:
            outcome = "captioned"
        else:
            outcome = "skipped"
        self.metrics.messages.labels(outcome=outcome).inc()

    # ------------------------------------------------------------------ retries and outages

    def _end_s3_outage_if_store_responded(self) -> None:
        """End the S3 outage once the store has responded to a fetch or probe, and make every waiting retry due now.

        The fetcher records only responses about an object (data, not found, access denied
        and the like) or to a probe. So a fetch that failed before sending a request,
        such as one for a bucket that is not allowed, does not end the outage.
        """
        if self.s3_outage_since is None or not self.fetcher.responded_since(self.s3_outage_since):
            return
        self.s3_outage_since = None
        now = time.monotonic()
        for item in self.fetch_retries:
            item.retry_at = min(item.retry_at, now)

    def _retry_due_fetches(self) -> None:
        now = time.monotonic()
        due = [item for item in self.fetch_retries if item.retry_at <= now and not item.partition.revoked]
        self.fetch_retries = [item for item in self.fetch_retries if item.retry_at > now and not item.partition.revoked]
        for item in due:
            self.retried_fetches.add(item)
            self._start_fetch(item)

    def _redeliver_due(self) -> None:
        now = time.monotonic()
        due = [item for item in self.redeliveries if item.retry_at <= now and not item.partition.revoked]
        self.redeliveries = [item for item in self.redeliveries if item.retry_at > now and not item.partition.revoked]
        for item in due:
            assert item.record is not None
            self.publisher.produce(item.record, functools.partial(self._on_delivered, item))

    def _update_outages(self) -> None:
        """Mark S3 or Kafka as down while any image or record waits for it; log each change once.

        A retried fetch in flight keeps the S3 outage on, because only a response of the
        store ends it. When no image waits for S3 any more (its partition was revoked), the
        outage ends too, because no retry is left to notice that the store is back.
        """
        self.fetch_retries = [item for item in self.fetch_retries if not item.partition.revoked]
        self.retried_fetches = {item for item in self.retried_fetches if not item.partition.revoked}
        if not self.fetch_retries and not self.retried_fetches:
            self.s3_outage_since = None
        self._set_outage("s3", self.s3_outage_since is not None)
        self._set_outage("kafka", self.brokers_down or bool(self.redeliveries))

    def _set_outage(self, dependency: str, active: bool) -> None:
        if active == self.health.has_outage(dependency):
            return
        self.health.set_outage(dependency, active)
        if active:
            logger.warning("outage: intake paused, worker unready", extra=fields(dependency=dependency))
        else:
            logger.info("outage over: intake resumed", extra=fields(dependency=dependency))

    # ------------------------------------------------------------------ backpressure

    def _pause_reason(self) -> str | None:
        if self.stopping or self.fatal_error is not None:
            return "stopping"
        if self.health.has_outage("s3") or self.health.has_outage("kafka"):
            return "outage"
        if len(self.backlog) >= self._backlog_limit():
            return "backlog full"
        return None

    def _has_room(self) -> bool:
        """Return True when the loop may start another message."""
        if self._pause_reason() not in (None, "backlog full"):
            return False
        if self._in_flight() >= self.settings.max_in_flight:
            return False
        # Enough decoded images wait for the engine; fetching more would only hold memory.
        return len(self.waiting) < self.settings.fetch_threads

    def _backlog_limit(self) -> int:
        return self.settings.max_in_flight

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition while the backlog is full, in an outage or when stopping, else resume."""
        reason = self._pause_reason()
        target = set(self.partitions) if reason else set()
        to_pause = target - self.paused
        to_resume = (self.paused | (self.newly_assigned & set(self.partitions))) - target
        try:
            if to_pause:
                self.consumer.pause([TopicPartition(topic, partition) for topic, partition in to_pause])
            if to_resume:
                self.consumer.resume([TopicPartition(topic, partition) for topic, partition in to_resume])
        except KafkaException as exc:
            # The partitions keep their old state, and the next loop step tries again.
            self.log_limiter.log(logger, logging.WARNING, "pause or resume failed", error=exc.args[0].str())
            return
        self.newly_assigned.clear()
        if to_pause or to_resume:
            # A full backlog comes and goes under full load, so only outages and shutdown log at info.
            level = logging.DEBUG if reason in (None, "backlog full") else logging.INFO
            logger.log(level, "partitions paused" if reason else "partitions resumed",
                       extra=fields(reason=reason, partitions=len(target or to_resume)))
        self.paused = target
        self.metrics.paused_partitions.set(len(self.paused))

    def _in_flight(self) -> int:
        return sum(len(partition.items) for partition in self.partitions.values())

    def _update_in_flight(self) -> None:
        self.metrics.in_flight.set(self._in_flight())

    def _unfinished(self, partitions: Iterable[PartitionWork]) -> int:
        """Return the images whose record is not yet acknowledged (at-least-once) or not yet built (exactly-once)."""
        if self.exactly_once:
            return sum(1 for partition in partitions for item in partition.items if item.record is None)
        return sum(len(partition.items) for partition in partitions)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, *, final: bool = False, wait: bool = True) -> None:
        self.next_checkpoint = time.monotonic() + self.settings.commit_interval_seconds
        if self.exactly_once:
            self._commit_transaction()
        else:
            self._serve_deliveries()
            self._commit_offsets(final=final, wait=wait)

    def _commit_offsets(self, *, final: bool = False, wait: bool = True) -> None:
        """Commit each partition up to its first offset not done (at-least-once).

        1. At a periodic checkpoint, skip while the last asynchronous commit has no result,
           for up to ASYNC_COMMIT_LIMIT_SECONDS.
        2. Take each partition's first offset whose records are not all acknowledged,
           so that no commit passes a delivery that is still outstanding.
        3. Commit those offsets:
           - at a periodic checkpoint (`wait` false), asynchronously, so that a coordinator
             that stops responding cannot block the loop. `_on_commit` gets the result in a
             later poll;
           - on revoke, synchronously, so that they are committed before the partitions go;
           - at shutdown (`final`), synchronously in a daemon thread bounded by COMMIT_TIMEOUT_SECONDS.
        4. Remember the positions that the broker accepted.
        A commit that a rebalance breaks is logged and counted, not fatal. A fatal error stops the worker.
        """
        if not wait and self._async_commit_pending():
            return
        positions = self.tracker.positions_to_commit()
        if not positions:
            return
        accepted: list[TopicPartition] = []

        def commit() -> None:
            accepted.extend(self.consumer.commit(offsets=_topic_partitions(positions), asynchronous=False) or [])

        try:
            if not wait:
                self.consumer.commit(offsets=_topic_partitions(positions), asynchronous=True)
                self.async_commit_since = time.monotonic()
                return
            if final:
                finished = _run_bounded(commit, COMMIT_TIMEOUT_SECONDS, "final-commit")
            else:
                commit()
                finished = True
        except KafkaException as exc:
            self._on_commit_failed(exc.args[0], positions)
            return
        if not finished:
            self.metrics.commits.labels(result="failed").inc()
            return
        self._record_commit(accepted)

    def _async_commit_pending(self) -> bool:
        """Return True while an asynchronous commit waits for its result, up to ASYNC_COMMIT_LIMIT_SECONDS."""
        if self.async_commit_since is None:
            return False
        if time.monotonic() - self.async_commit_since < ASYNC_COMMIT_LIMIT_SECONDS:
            return True
        # librdkafka reports every commit, but a lost report must not stop commits for good.
        logger.warning("no result for the last offset commit, committing again",
                       extra=fields(waited_seconds=ASYNC_COMMIT_LIMIT_SECONDS))
        self.async_commit_since = None
        return False

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Take the result of an asynchronous commit; runs inside consume()."""
        self.async_commit_since = None
        if err is not None:
            self._on_commit_failed(err, {(tp.topic, tp.partition): tp.offset for tp in partitions})
            return
        self._record_commit(partitions)

    def _record_commit(self, accepted: list[TopicPartition]) -> None:
        done = {(tp.topic, tp.partition): tp.offset for tp in accepted if tp.error is None}
        self.tracker.mark_committed(done)
        failed = [tp for tp in accepted if tp.error is not None]
        self.metrics.commits.labels(result="failed" if failed else "ok").inc()
        for tp in failed:
            logger.warning("offset commit failed", extra=fields(topic=tp.topic, partition=tp.partition,
                                                                 offset=tp.offset, error=tp.error.str()))
        logger.debug("offsets committed", extra=fields(positions=done))

    def _on_commit_failed(self, err: KafkaError, positions: dict[TopicPartitionKey, int]) -> None:
        self.metrics.commits.labels(result="failed").inc()
        if err.fatal():
            self._on_kafka_error(err)
            return
        kind = "rebalance" if err.code() in REBALANCE_COMMIT_ERRORS else "error"
        self.log_limiter.log(logger, logging.WARNING, "offset commit failed", repeat_key=("commit failed", err.name()),
                             kind=kind, error=err.str(), code=err.name(), positions=positions)

    def _commit_transaction(self) -> None:
        """Commit done work in one Kafka transaction (exactly-once).

        1. Take each partition's first offset that is not done.
        2. Begin a transaction and produce the records of every message before that offset.
        3. Send those offsets to the transaction, with the consumer's group metadata.
        4. Commit the transaction, which flushes the producer first.
        5. Release the sent messages and remember the committed positions.
        An abortable error aborts the transaction and rewinds the consumer to the last committed
        offsets. Any other error stops the worker as a fatal Kafka error.
        """
        positions = self.tracker.positions_to_commit()
        if not positions:
            return
        batch = [
            message
            for tp, position in positions.items()
            for offset, message in sorted(self.partitions[tp].outbox.items())
            if offset < position
        ]
        producer = self.publisher.producer
        try:
            producer.begin_transaction()
            for message in batch:
                for item in message.finished:
                    assert item.record is not None
                    self.publisher.produce(item.record, functools.partial(self._on_delivered_in_transaction, item))
            producer.send_offsets_to_transaction(
                _topic_partitions(positions), self.consumer.consumer_group_metadata(), TRANSACTION_TIMEOUT_SECONDS
            )
            producer.commit_transaction(TRANSACTION_TIMEOUT_SECONDS)
        except KafkaException as exc:
            self._on_transaction_failed(exc.args[0])
            return

        for message in batch:
            message.partition.outbox.pop(message.offset, None)
            message.partition.items.difference_update(message.finished)
        self.tracker.mark_committed(positions)
        self.metrics.transactions.labels(result="committed").inc()
        self.metrics.commits.labels(result="ok").inc()
        self._update_in_flight()
        logger.debug("transaction committed", extra=fields(messages=len(batch), positions=positions))

    def _on_transaction_failed(self, err: KafkaError) -> None:
        """Abort and rewind on an abortable error, and treat any other error as fatal."""
        self.metrics.commits.labels(result="failed").inc()
        if not err.txn_requires_abort():
            logger.error("transaction failed", extra=fields(error=err.str(), fatal=err.fatal()))
            self._set_fatal(err)
            return
        logger.warning("transaction aborted, rewinding to the committed offsets", extra=fields(error=err.str()))
        try:
            self.publisher.producer.abort_transaction(TRANSACTION_TIMEOUT_SECONDS)
        except KafkaException as exc:
            self._set_fatal(exc.args[0])
            return
        self.metrics.transactions.labels(result="aborted").inc()
        self._rewind_all()

    def _rewind_all(self) -> None:
        """Rewind every assigned partition after an aborted transaction.

        1. Read each partition's last committed position from the tracker.
        2. Drop the partition's work and offsets, so no late result of it is sent.
        3. Seek the consumer back to that position, to consume the messages again.
        """
        for tp in list(self.partitions):
            position = self.tracker.committed(tp)
            self._forget(tp)
            self.partitions[tp] = PartitionWork(tp)
            if position is not None:
                self._seek(tp, position)

    def _rewind_to(self, message: Message) -> None:
        self._seek((message.topic(), message.partition()), message.offset())

    def _seek(self, tp: TopicPartitionKey, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.warning("seek failed", extra=fields(topic=tp[0], partition=tp[1], offset=offset,
                                                       error=exc.args[0].str()))

    # ------------------------------------------------------------------ rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take on newly assigned partitions.

        1. Create empty work state for each of them.
        2. Mark the consumer as in its group, for /readyz (also for an empty assignment).
        The next backpressure step pauses them if the worker is still full, and resumes them otherwise.
        """
        self.metrics.rebalances.labels(kind="assign").inc()
        for tp in _keys(partitions):
            self.partitions[tp] = PartitionWork(tp)
            self.newly_assigned.add(tp)
        self.metrics.assigned_partitions.set(len(self.partitions))
        self.health.set_in_group(True)
        logger.info("partitions assigned", extra=fields(partitions=self._names(partitions)))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Give up revoked partitions.

        1. Stop taking messages from them: this callback runs inside poll, and after it
           returns, messages of partitions that are not assigned are ignored.
        2. Wait for their in-flight images up to drain_timeout_seconds, serving deliveries
           (skipped while the consumer closes, because shutdown has drained already).
        3. Commit what is done, synchronously.
        4. Forget the rest, so that late results are neither produced nor committed; the new owner redoes them.
        """
        self.metrics.rebalances.labels(kind="revoke").inc()
        revoked = [tp for tp in _keys(partitions) if tp in self.partitions]
        logger.info("partitions revoked", extra=fields(partitions=self._names(partitions)))
        if not revoked:
            return

        deadline = time.monotonic() + self.settings.drain_timeout_seconds
        works = [self.partitions[tp] for tp in revoked]
        while not self.closing and self._unfinished(works) and time.monotonic() < deadline:
            self._process_completed()
            self.publisher.poll(BUSY_POLL_SECONDS)
        if self._unfinished(works):
            logger.warning("revoked partitions still had work; the new owner will redo it",
                           extra=fields(images=self._unfinished(works)))

        self._checkpoint(final=self.closing)

        for tp in revoked:
            self._forget(tp)
        self._after_partitions_removed()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Forget lost partitions without committing, because another member may own them already.

        The session timed out, so the consumer is out of its group and /readyz fails until the next assignment.
        """
        self.metrics.rebalances.labels(kind="lost").inc()
        self.health.set_in_group(False)
        logger.warning("partitions lost", extra=fields(partitions=self._names(partitions)))
        for tp in _keys(partitions):
            self._forget(tp)
        self._after_partitions_removed()

    def _forget(self, tp: TopicPartitionKey) -> None:
        """Drop a partition's work and offsets, so that late results for it are ignored.

        Its images still in the engine are cancelled, so their slots and KV cache go to the
        partitions that stay. The new owner captions them again.
        """
        partition = self.partitions.pop(tp, None)
        if partition is not None:
            partition.revoked = True
            for item in partition.items:
                if item.caption is not None:
                    item.caption.cancel()
        self.tracker.forget(tp)
        self.paused.discard(tp)
        self.backlog = deque(message for message in self.backlog if (message.topic(), message.partition()) != tp)
        try:
            self.metrics.consumer_lag.remove(str(tp[1]))
        except KeyError:
            pass

    def _after_partitions_removed(self) -> None:
        self.waiting = deque(item for item in self.waiting if not item.partition.revoked)
        self.metrics.assigned_partitions.set(len(self.partitions))
        self.metrics.paused_partitions.set(len(self.paused))
        self._update_in_flight()

    @staticmethod
    def _names(partitions: list[TopicPartition]) -> str:
        return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)

    # ------------------------------------------------------------------ client callbacks

    def _on_kafka_error(self, err: KafkaError) -> None:
        """Count a client error and handle it: fatal ones stop the worker, a broker outage pauses it.

        librdkafka reports a refused connection every few tens of milliseconds, so
        repeats of one error are logged at most every 30 s, with a count.
        """
        self.metrics.kafka_errors.labels(code=err.name()).inc()
        if err.fatal():
            self._set_fatal(err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
            self.log_limiter.log(logger, logging.WARNING, "all brokers down", error=err.str())
        else:
            self.log_limiter.log(logger, logging.WARNING, "Kafka client error", repeat_key=("client error", err.name()),
                                 error=err.str(), code=err.name())

    def _set_fatal(self, err: KafkaError) -> None:
        if self.fatal_error is None:
            logger.error("fatal Kafka error, stopping", extra=fields(error=err.str(), code=err.name()))
        self.fatal_error = err
        self.health.set_fatal(f"fatal Kafka error: {err.str()}")

    def _on_stats(self, stats_json: str) -> None:
        """Export consumer lag per assigned partition and notice when a broker is reachable again."""
        stats = json.loads(stats_json)
        if any(broker.get("state") == "UP" for broker in stats.get("brokers", {}).values()):
            self.brokers_down = False
        topic = self.settings.input_topic
        for name, entry in stats.get("topics", {}).get(topic, {}).get("partitions", {}).items():
            tp = (topic, int(name))
            lag = self._consumer_lag(tp, entry) if tp in self.partitions else None
            if lag is not None:
                self.metrics.consumer_lag.labels(partition=name).set(lag)

    def _consumer_lag(self, tp: TopicPartitionKey, entry: dict[str, Any]) -> int | None:
        """Return the messages between a partition's end offset and this worker's committed position.

        The position is, in order of preference:
        1. the offset that this worker committed last;
        2. the group's committed offset, through librdkafka's own `consumer_lag`. In
           exactly-once mode the producer commits inside each transaction, so the consumer
           learns the group's offset only at assignment, and this worker's own commits win;
        3. the partition's first offset (its low watermark) when the group has committed
           nothing and the consumer starts from the earliest message, which also gives an
           empty partition a lag of 0.
        """
        # A read_committed consumer reads up to the last stable offset, not the high watermark.
        end = entry.get("ls_offset" if self.exactly_once else "hi_offset", -1)
        committed = self.tracker.committed(tp)
        if end >= 0 and committed is not None:
            return max(0, end - committed)
        lag = entry.get("consumer_lag", -1)
        if lag >= 0:
            return lag
        first = entry.get("lo_offset", -1)
        if self.starts_at_earliest and entry.get("committed_offset", -1) < 0 and end >= 0 and first >= 0:
            return max(0, end - first)
        return None

    def _item_fields(self, item: WorkItem, **extra: Any) -> dict[str, Any]:
        return fields(**self._item_values(item, **extra))

    @staticmethod
    def _item_values(item: WorkItem, **extra: Any) -> dict[str, Any]:
        source = item.message.source
        return dict(topic=source.topic, partition=source.partition, offset=source.offset,
                    event_id=item.request_id, **extra)


# ---------------------------------------------------------------------- command


def run_command(args: argparse.Namespace) -> int:
    """Run the streaming worker until a signal or a fatal error, and return the process exit code."""
    settings = load_command_settings(args)
    if settings is None:
        return EXIT_USAGE
    logger.info("settings", extra=fields(summary=settings.summary()))

    metrics = Metrics()
    metrics.info.info({"model": settings.model.name, "device": settings.device, "version": __version__})
    health = HealthState(metrics, settings.max_poll_gap_seconds)
    try:
        server = HealthServer(settings.metrics_host, settings.metrics_port, metrics, health)
    except OSError as error:
        # An unknown host name raises socket.gaierror, a port in use OSError(EADDRINUSE); both are settings errors.
        logger.error("metrics server cannot listen, check --metrics-host and --metrics-port",
                     extra=fields(host=settings.metrics_host, port=settings.metrics_port, error=str(error)))
        return EXIT_USAGE
    stop_event = threading.Event()
    _install_signal_handlers(stop_event)
    server.start()
    try:
        return _run_with_server(settings, metrics, health, stop_event)
    finally:
        server.close()


def _run_with_server(settings: Settings, metrics: Metrics, health: HealthState, stop_event: threading.Event) -> int:
    """Build the worker, load the model, and run the stream loop.

    1. Create the engine without loading the model, and the S3 fetcher.
    2. Create the Kafka clients, so an invalid --kafka-option stops the worker
       before the model loads, which takes minutes with a real model.
    3. Load the model and caption the warm-up image.
    4. Run the loop. The engine and the fetcher are closed in every case.
    """
    try:
        engine = EngineProcess.from_settings(settings, metrics)
        fetcher = Fetcher(settings, metrics)
    except ModelLoadError as exc:
        # The message names the missing or invalid file; a traceback adds nothing.
        logger.error("startup failed: model could not be loaded", extra=fields(model=str(settings.model), error=str(exc)))
        return EXIT_STARTUP
    except Exception:
        logger.exception("startup failed: model or dependency could not be loaded")
        return EXIT_STARTUP

    try:
        try:
            worker = Worker(settings, metrics, health, engine, fetcher, stop_event)
        except (KafkaException, TypeError, ValueError) as exc:
            message = exc.args[0].str() if isinstance(exc, KafkaException) else str(exc)
            logger.error("invalid Kafka configuration, check --kafka-option", extra=fields(error=message))
            return EXIT_USAGE

        try:
            engine.start()
            health.set_model_loaded()
            engine.warm_up()
            health.set_warmed_up()
        except ModelLoadError as exc:
            logger.error("startup failed: model could not be loaded", extra=fields(model=str(settings.model), error=str(exc)))
            worker.close_unstarted()
            return EXIT_STARTUP
        except Exception:
            logger.exception("startup failed: model or dependency could not be loaded")
            worker.close_unstarted()
            return EXIT_STARTUP
        metrics.info.info({"model": engine.model_name, "device": settings.device, "version": __version__})
        logger.info("model ready", extra=fields(model=engine.model_name, device=settings.device))

        try:
            return worker.run()
        except KafkaException as exc:
            logger.error("Kafka call failed", extra=fields(error=exc.args[0].str()))
            return EXIT_KAFKA_FATAL if exc.args[0].fatal() else EXIT_FAILURE
        except Exception:
            logger.exception("worker failed")
            return EXIT_FAILURE
    finally:
        # The drain is over, and the engine's remaining work stays uncommitted, so it gets no time to finish.
        engine.close(0.0)
        fetcher.close()


def _install_signal_handlers(stop_event: threading.Event) -> None:
    """Stop in order on the first SIGTERM or SIGINT, and exit at once on the second."""

    def handle(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop_event.is_set():
            logger.warning("second signal, exiting now", extra=fields(signal=name))
            os._exit(EXIT_SIGNAL)
        logger.info("signal received, shutting down", extra=fields(signal=name))
        stop_event.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

"""Output and error records, and the idempotent (optionally transactional) producer that sends them.

Text fields of the original message in an error record are UTF-8 strings when
the bytes decode, else `{"base64": "..."}`, and null when absent.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, Message, Producer

from worker.errors import CaptionError, ErrorCode
from worker.logs import KafkaClientLogger, RepeatLimiter
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.engine import CaptionResult
    from worker.events import ImageRequest

logger = logging.getLogger(__name__)

# Input headers copied to the output and error records (W3C trace context).
COPIED_HEADERS = ("traceparent",)

# Seconds that a produce call waits for room in a full producer queue before it tries again.
QUEUE_FULL_WAIT_SECONDS = 0.1

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class SourceMessage:
    """The parts of one consumed input message that records refer to or copy."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    # Broker or producer timestamp in milliseconds, or None when the message has none.
    timestamp_ms: int | None = None

    @classmethod
    def from_message(cls, message: Message) -> SourceMessage:
        kind, stamp = message.timestamp()
        return cls(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=message.value(),
            headers=list(message.headers() or []),
            timestamp_ms=stamp if kind != 0 and stamp > 0 else None,  # 0 is TIMESTAMP_NOT_AVAILABLE
        )

    def source(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}

    def copied_headers(self) -> Headers:
        return [(name, value) for name, value in self.headers if name in COPIED_HEADERS]


@dataclass(frozen=True)
class OutboundRecord:
    """One record ready to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


def utc_now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_bytes(data: bytes | None) -> str | dict[str, str] | None:
    """Return `data` as UTF-8 text when it decodes, else as `{"base64": ...}`; None stays None."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _record_key(message: SourceMessage, image_uri: str | None) -> bytes | None:
    if message.key:
        return message.key
    return image_uri.encode("utf-8") if image_uri else None


def _dump(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def build_output_record(
    settings: Settings,
    message: SourceMessage,
    request: ImageRequest,
    caption: CaptionResult,
    *,
    model: str,
    timings: dict[str, float],
) -> OutboundRecord:
    """Build the caption record of one image, or raise CaptionError(output_too_large) above max_output_bytes.

    `timings` contains seconds for fetch, decode, queue,
    time_to_first_token, generation and total.
    """
    payload = {
        "id": request.id,
        "image": request.image.uri,
        "caption": caption.text,
        "model": model,
        "finish_reason": caption.finish_reason,
        "generated_tokens": caption.generated_tokens,
        "timings": {name: round(seconds, 6) for name, seconds in timings.items()},
        "source": message.source(),
        "metadata": request.metadata,
        "created_at": utc_now_rfc3339(),
    }
    value = _dump(payload)
    if len(value) > settings.max_output_bytes:
        raise CaptionError(
            ErrorCode.OUTPUT_TOO_LARGE,
            f"output record of {len(value)} bytes exceeds --max-output-bytes {settings.max_output_bytes}",
        )
    key = _record_key(message, request.image.uri)
    return OutboundRecord(settings.output_topic, key, value, message.copied_headers())


def build_error_record(
    settings: Settings,
    message: SourceMessage,
    error: CaptionError,
    *,
    request_id: str | None,
    image_uri: str | None,
    attempts: int,
) -> OutboundRecord:
    """Build the dead-letter record of one failed image or unreadable message.

    When the record would exceed max_output_bytes, the original value is replaced
    by `{"omitted_bytes": N}` so that the error itself still reaches the topic.
    """
    original = {
        "key": encode_bytes(message.key),
        "value": encode_bytes(message.value),
        "headers": [{"key": name, "value": encode_bytes(value)} for name, value in message.headers],
    }
    payload = {
        "error": error.to_dict(),
        "source": message.source(),
        "attempts": attempts,
        "id": request_id,
        "image": image_uri,
        "original": original,
        "created_at": utc_now_rfc3339(),
    }
    value = _dump(payload)
    if len(value) > settings.max_output_bytes:
        original["value"] = {"omitted_bytes": len(message.value or b"")}
        value = _dump(payload)
    key = _record_key(message, image_uri)
    return OutboundRecord(settings.dlq_topic, key, value, message.copied_headers())


def transactional_id(settings: Settings) -> str:
    """Return the transactional.id of this process: the setting, else `<group id>-<host name>-<pid>-<8 hex digits>`.

    Producers that run at the same time need distinct ids, because a new producer
    fences an older one with the same id. The host name and the process id alone
    can repeat (two containers that share a host name), so a random part is added.
    The id need not survive a restart: the worker sends offsets with the consumer's
    group metadata, so the broker rejects the offsets of a replica that left the group.
    """
    if settings.transactional_id:
        return settings.transactional_id
    return f"{settings.group_id}-{socket.gethostname()}-{_process_token()}"


@functools.cache
def _process_token() -> str:
    # Computed once, so every producer config of one process has the same id.
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def producer_config(settings: Settings, *, error_cb: Callable[[KafkaError], None] | None = None) -> dict[str, Any]:
    """Return the producer's librdkafka configuration.

    Idempotence and acks=all are enforced because an input offset is committed as
    soon as its record is acknowledged; --kafka-option may set anything else.
    """
    config: dict[str, Any] = {"linger.ms": 5, "compression.type": "lz4"}
    config.update(settings.kafka_common_config())
    config.update({"enable.idempotence": True, "acks": "all"})
    if settings.delivery == "exactly-once":
        config["transactional.id"] = transactional_id(settings)
    # librdkafka's own log lines go through the worker's log format; Publisher.poll() serves them.
    config["logger"] = KafkaClientLogger()
    if error_cb is not None:
        config["error_cb"] = error_cb
    return config


DeliveryCallback = Callable[[KafkaError | None], None]


class Publisher:
    """The producer: sends records and reports each acknowledgement or failure to a callback.

    Delivery callbacks run inside `poll()` and `flush()`, on the caller's thread.
    """

    def __init__(self, settings: Settings, *, error_cb: Callable[[KafkaError], None] | None = None) -> None:
        self.producer = Producer(producer_config(settings, error_cb=error_cb))
        self._log_limiter = RepeatLimiter()

    def produce(self, record: OutboundRecord, on_delivery: DeliveryCallback) -> None:
        """Queue `record`; when the local queue is full, serve deliveries until there is room."""

        def report(err: KafkaError | None, _message: Message) -> None:
            on_delivery(err)

        while True:
            try:
                self.producer.produce(
                    record.topic, value=record.value, key=record.key, headers=record.headers, on_delivery=report
                )
                return
            except BufferError:
                self._log_limiter.log(logger, logging.WARNING, "producer queue full, waiting", topic=record.topic)
                self.producer.poll(QUEUE_FULL_WAIT_SECONDS)

    def poll(self, timeout: float = 0.0) -> None:
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for every queued record; return how many are still not acknowledged."""
        deadline = time.monotonic() + timeout
        remaining = len(self.producer)
        while remaining and time.monotonic() < deadline:
            remaining = self.producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        return remaining

    def pending(self) -> int:
        return len(self.producer)

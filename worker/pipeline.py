"""State of the work between poll and acknowledgement: messages, images and assigned partitions.

Only the stream loop's thread reads or changes these objects, except that a
fetch thread fills the timing fields of the WorkItem it is working on before
its future completes.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.errors import CaptionError
from worker.publishing import OutboundRecord, SourceMessage

if TYPE_CHECKING:
    from worker.events import ImageRequest
    from worker.images import DecodedImage

TopicPartitionKey = tuple[str, int]

# Backoff of an image whose fetch met an unhealthy store: doubles from the first to the last value.
# The cap is low because these retries are how the worker notices that the store is back.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 4.0


@dataclass(eq=False)
class MessageWork:
    """One consumed input message and the records of its images."""

    source: SourceMessage
    partition: PartitionWork
    # Monotonic time when the message was polled, the start of the `total` timing.
    received_at: float = field(default_factory=time.monotonic)
    # Images and failures of the message, each ending in one output or error record.
    parts: int = 0
    dead_lettered: bool = False
    # Items whose record is built, kept until a transaction sends them (exactly-once mode only).
    finished: list[WorkItem] = field(default_factory=list)

    @property
    def tp(self) -> TopicPartitionKey:
        return (self.source.topic, self.source.partition)

    @property
    def offset(self) -> int:
        return self.source.offset


@dataclass(eq=False)
class WorkItem:
    """One image of a message, or one failure of a message that becomes an error record."""

    message: MessageWork
    request: ImageRequest | None
    # Set for a record that failed before fetching; such an item goes straight to the dead-letter topic.
    error: CaptionError | None = None
    failed_id: str | None = None
    failed_image: str | None = None
    attempts: int = 0
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0
    decoded: DecodedImage | None = None
    # The engine's future while the image is being captioned, so that a revoke can cancel it.
    caption: Future | None = None
    # Captions that failed with a retryable error; the image is fetched and captioned again.
    caption_failures: int = 0
    # Fetches that met an unhealthy store, and when the next try is due (monotonic seconds).
    transient_failures: int = 0
    retry_at: float = 0.0
    record: OutboundRecord | None = None

    @property
    def partition(self) -> PartitionWork:
        return self.message.partition

    @property
    def request_id(self) -> str | None:
        return self.request.id if self.request is not None else self.failed_id

    @property
    def image_uri(self) -> str | None:
        return self.request.image.uri if self.request is not None else self.failed_image

    def schedule_retry(self) -> float:
        """Set retry_at after one more transient failure, with full jitter, and return the delay."""
        self.transient_failures += 1
        ceiling = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self.transient_failures - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        self.retry_at = time.monotonic() + delay
        return delay


@dataclass(eq=False)
class PartitionWork:
    """The work of one assigned partition. A revoked one is dropped, and late results for it are ignored."""

    tp: TopicPartitionKey
    # Images between poll and acknowledgement (or until a transaction sends them, in exactly-once mode).
    items: set[WorkItem] = field(default_factory=set)
    # Messages whose records are built but not yet sent, by offset (exactly-once mode only).
    outbox: dict[int, MessageWork] = field(default_factory=dict)
    revoked: bool = False

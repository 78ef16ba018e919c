"""Error codes that end on the dead-letter topic, and the exception that carries them."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Reason codes of error records; the README lists the cause of each."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"
    IMAGE_NOT_FOUND = "image_not_found"
    ACCESS_DENIED = "access_denied"
    EMPTY_OBJECT = "empty_object"
    OBJECT_TOO_LARGE = "object_too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    IMAGE_TOO_LARGE = "image_too_large"
    BAD_DIMENSIONS = "bad_dimensions"
    FETCH_FAILED = "fetch_failed"
    GENERATION_FAILED = "generation_failed"
    EMPTY_CAPTION = "empty_caption"
    OUTPUT_TOO_LARGE = "output_too_large"


class CaptionError(Exception):
    """A failure of one image that is final for this attempt and goes to the dead-letter topic.

    `retryable` is true when replaying the input later may succeed, because the
    store kept failing on it, and false for input that is bad and will fail again.
    """

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}


class TransientError(Exception):
    """A failure of a dependency (S3 or the broker) that is expected to heal.

    The stream never dead-letters on it: it pauses intake, marks itself unready
    and tries the same message again later.
    """


class EngineFull(Exception):
    """Raised by the engine when its admission queue is full; the caller pauses and retries."""


class EngineStopped(Exception):
    """The caption engine stopped for good (its process or thread died), so no request can finish.

    The stream never dead-letters on it: it stops, leaving the offsets of unfinished
    images uncommitted, so that they are captioned again after a restart.
    """

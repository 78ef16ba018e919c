"""Input events: turn one Kafka message value into image requests.

Three shapes are distinguished by their content:

- own events: `{"image": "s3://bucket/key"}` or `{"image": {"bucket", "key", "version_id"}}`
  with optional `id`, `prompt`, `max_new_tokens` and `metadata`;
- Amazon S3 event notifications: a `Records` array, one image per `ObjectCreated:*` record;
- MinIO bucket notifications: the same `Records` inside an envelope with `EventName` and `Key`.

Keys in notifications are URL-encoded with `+` for a space (MinIO also encodes `/`)
and are decoded exactly once here. Keys in own events, in both the URI and the
object form, are literal: `s3://b/a%20b.jpg` names the object `a%20b.jpg`.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from worker.errors import CaptionError, ErrorCode
from worker.settings import Settings

# A real notification has a handful of records, so thousands mean a bug or an attack.
MAX_RECORDS = 1000
# Metadata is copied into every output record, so it must stay small next to the caption.
MAX_METADATA_BYTES = 16 * 1024
MAX_ID_CHARS = 512
# S3 rejects keys longer than 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024

# Schemes that fetching implements. settings.allowed_schemes can only narrow this set.
IMPLEMENTED_SCHEMES = frozenset({"s3"})

SKIP_TEST_EVENT = "test_event"
SKIP_NOT_CREATED = "not_created"
SKIP_FOLDER = "folder"
SKIP_NULL_VALUE = "null_value"

_IMAGE_OBJECT_FIELDS = frozenset({"bucket", "key", "version_id"})


@dataclass(frozen=True)
class ImageRef:
    """Location of one image: scheme, bucket, literal (decoded) key and optional version."""

    scheme: str
    bucket: str
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ImageRequest:
    """One image to caption, with the per-event overrides of the prompt and token budget."""

    image: ImageRef
    id: str
    prompt: str | None = None
    max_new_tokens: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RecordFailure:
    """A record of a message that cannot be captioned, with its id and image URI where readable."""

    error: CaptionError
    id: str | None
    image: str | None


@dataclass(frozen=True)
class ParsedMessage:
    """Images to caption, failed records and skip reasons found in one message."""

    images: list[ImageRequest]
    failures: list[RecordFailure]
    skipped: list[str]


class _RecordError(Exception):
    """A problem of one record, raised inside the record parsers and turned into a RecordFailure."""

    def __init__(self, code: ErrorCode, message: str, image: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.image = image


class _Skip(Exception):
    """A record that is skipped and counted, not captioned nor dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_message(value: bytes | None, *, default_id: str, settings: Settings) -> ParsedMessage:
    """Parse one message value into image requests, per-record failures and skip reasons.

    Raises CaptionError with invalid_json when the value is not a UTF-8 JSON object,
    and with invalid_event when it is an object of no known shape.
    """
    if value is None:
        return ParsedMessage([], [], [SKIP_NULL_VALUE])
    document = _load_json(value)
    if document is None:
        return ParsedMessage([], [], [SKIP_NULL_VALUE])
    if not isinstance(document, dict):
        raise CaptionError(
            ErrorCode.INVALID_JSON, f"message value is JSON {type(document).__name__}, expected an object"
        )

    if document.get("Event") == "s3:TestEvent":
        return ParsedMessage([], [], [SKIP_TEST_EVENT])
    if "Records" in document or "EventName" in document:
        return _parse_notification(document, default_id, settings)
    if "image" in document:
        return _parse_own_event(document, default_id, settings)
    raise CaptionError(
        ErrorCode.INVALID_EVENT,
        "message has neither `image` nor `Records`; expected an own event or an S3 or MinIO notification",
    )


def _load_json(value: bytes) -> Any:
    if not value:
        raise CaptionError(ErrorCode.INVALID_JSON, "message value is empty")
    try:
        text = value.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            ErrorCode.INVALID_JSON, f"message value is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CaptionError(ErrorCode.INVALID_JSON, f"message value is not JSON: {exc.msg} at char {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError comes from NaN or Infinity, RecursionError from absurdly deep nesting.
        raise CaptionError(ErrorCode.INVALID_JSON, f"message value is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _record_id(base_id: str, index: int) -> str:
    return base_id if index == 0 else f"{base_id}-{index}"


# Own events


def _parse_own_event(document: dict[str, Any], default_id: str, settings: Settings) -> ParsedMessage:
    # The id is read first so that a failure of any other field still names the event.
    try:
        event_id = _read_id(document.get("id"), default_id)
    except _RecordError as exc:
        failure = RecordFailure(CaptionError(exc.code, exc.message), None, _readable_uri(document.get("image")))
        return ParsedMessage([], [failure], [])

    try:
        request = _build_own_request(document, event_id, settings)
    except _Skip as skip:
        return ParsedMessage([], [], [skip.reason])
    except _RecordError as exc:
        image = exc.image or _readable_uri(document.get("image"))
        return ParsedMessage([], [RecordFailure(CaptionError(exc.code, exc.message), event_id, image)], [])
    return ParsedMessage([request], [], [])


def _build_own_request(document: dict[str, Any], event_id: str, settings: Settings) -> ImageRequest:
    image_value = document["image"]
    if image_value is None:
        raise _Skip(SKIP_NULL_VALUE)
    if isinstance(image_value, str):
        ref = _parse_uri(image_value, settings)
    elif isinstance(image_value, dict):
        ref = _parse_image_object(image_value)
    else:
        raise _RecordError(
            ErrorCode.INVALID_EVENT,
            f"`image` is {_json_type(image_value)}, expected an s3:// URI string or an object with bucket and key",
        )
    if ref.key.endswith("/"):
        raise _Skip(SKIP_FOLDER)

    return ImageRequest(
        image=ref,
        id=event_id,
        prompt=_read_prompt(document.get("prompt"), settings, ref.uri),
        max_new_tokens=_read_max_new_tokens(document.get("max_new_tokens"), settings, ref.uri),
        metadata=_read_metadata(document.get("metadata"), ref.uri),
    )


def _parse_uri(uri: str, settings: Settings) -> ImageRef:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"`image` {_shorten(uri)!r} is not a URI of the form s3://bucket/key")
    scheme = scheme.lower()
    allowed = {s.lower() for s in settings.allowed_schemes} & IMPLEMENTED_SCHEMES
    if scheme not in allowed:
        raise _RecordError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"image URI scheme {_shorten(scheme)!r} is not supported; allowed: {', '.join(sorted(allowed)) or 'none'}",
            image=_shorten(uri),
        )
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"image URI {_shorten(uri)!r} lacks a bucket or a key", image=uri)
    _check_key(key, uri)
    return ImageRef(scheme=scheme, bucket=bucket, key=key)


def _parse_image_object(value: dict[str, Any]) -> ImageRef:
    unknown = sorted(set(value) - _IMAGE_OBJECT_FIELDS)
    if unknown:
        raise _RecordError(
            ErrorCode.INVALID_EVENT,
            f"`image` has unknown fields {unknown}; expected bucket, key and optional version_id",
        )
    bucket = value.get("bucket")
    key = value.get("key")
    version_id = value.get("version_id")
    if not isinstance(bucket, str) or not bucket:
        raise _RecordError(ErrorCode.INVALID_EVENT, "`image.bucket` must be a non-empty string")
    if not isinstance(key, str) or not key:
        raise _RecordError(ErrorCode.INVALID_EVENT, "`image.key` must be a non-empty string")
    uri = f"s3://{bucket}/{key}"
    if version_id is not None and (not isinstance(version_id, str) or not version_id):
        raise _RecordError(ErrorCode.INVALID_EVENT, "`image.version_id` must be a non-empty string or null", image=uri)
    _check_key(key, uri)
    return ImageRef(scheme="s3", bucket=bucket, key=key, version_id=version_id)


def _read_id(value: Any, default_id: str) -> str:
    if value is None:
        return default_id
    if not isinstance(value, str) or not value:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"`id` is {_json_type(value)}, expected a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"`id` has {len(value)} characters, maximum {MAX_ID_CHARS}")
    return value


# Text that the engine's chat template or OpenVINO GenAI gives a meaning: in a user prompt
# it would add image slots or turns, which the pipeline rejects or the model misreads.
RESERVED_PROMPT_MARKERS = (
    "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<ov_genai_image_", "<start_of_turn>", "<end_of_turn>",
    "<bos>", "<eos>",
)


def _read_prompt(value: Any, settings: Settings, uri: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _RecordError(
            ErrorCode.INVALID_EVENT, f"`prompt` is {_json_type(value)}, expected a non-empty string", image=uri
        )
    if len(value) > settings.max_prompt_chars:
        raise _RecordError(
            ErrorCode.INVALID_EVENT,
            f"`prompt` has {len(value)} characters, maximum {settings.max_prompt_chars} (--max-prompt-chars)",
            image=uri,
        )
    marker = next((marker for marker in RESERVED_PROMPT_MARKERS if marker in value), None)
    if marker is not None:
        raise _RecordError(
            ErrorCode.INVALID_EVENT, f"`prompt` contains {marker!r}, which is reserved for the chat template", image=uri
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        message = "`prompt` contains a lone surrogate (\\ud800 to \\udfff), which is not valid Unicode text"
        raise _RecordError(ErrorCode.INVALID_EVENT, message, image=uri) from None
    return value


def _read_max_new_tokens(value: Any, settings: Settings, uri: str) -> int | None:
    if value is None:
        return None
    # bool is a subclass of int, but `true` is never a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RecordError(
            ErrorCode.INVALID_EVENT, f"`max_new_tokens` is {_json_type(value)}, expected an integer", image=uri
        )
    if not 1 <= value <= settings.max_new_tokens:
        raise _RecordError(
            ErrorCode.INVALID_EVENT,
            f"`max_new_tokens` is {value}, expected 1 to {settings.max_new_tokens} (--max-new-tokens)",
            image=uri,
        )
    return value


def _read_metadata(value: Any, uri: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _RecordError(ErrorCode.INVALID_EVENT, f"`metadata` is {_json_type(value)}, expected an object", image=uri)
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise _RecordError(
            ErrorCode.INVALID_EVENT, f"`metadata` has {size} bytes as JSON, maximum {MAX_METADATA_BYTES}", image=uri
        )
    return value


# Amazon S3 and MinIO notifications


def _parse_notification(document: dict[str, Any], default_id: str, settings: Settings) -> ParsedMessage:
    records = document.get("Records")
    if records is None:
        # In a MinIO envelope without records, only its EventName shows what happened.
        event_name = document.get("EventName")
        if isinstance(event_name, str) and not _is_create_event(event_name):
            return ParsedMessage([], [], [_skip_reason_of_event(event_name)])
        raise CaptionError(ErrorCode.INVALID_EVENT, "notification has no `Records` array")
    if not isinstance(records, list):
        raise CaptionError(ErrorCode.INVALID_EVENT, f"`Records` is {_json_type(records)}, expected an array")
    if not records:
        raise CaptionError(ErrorCode.INVALID_EVENT, "`Records` is empty")
    if len(records) > MAX_RECORDS:
        raise CaptionError(ErrorCode.INVALID_EVENT, f"`Records` has {len(records)} entries, maximum {MAX_RECORDS}")

    images: list[ImageRequest] = []
    failures: list[RecordFailure] = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        record_id = _record_id(default_id, index)
        try:
            ref = _parse_notification_record(record, index, settings)
        except _Skip as skip:
            skipped.append(skip.reason)
        except _RecordError as exc:
            failures.append(RecordFailure(CaptionError(exc.code, exc.message), record_id, exc.image))
        else:
            images.append(ImageRequest(image=ref, id=record_id))
    return ParsedMessage(images, failures, skipped)


def _parse_notification_record(record: Any, index: int, settings: Settings) -> ImageRef:
    where = f"Records[{index}]"
    if record is None:
        raise _Skip(SKIP_NULL_VALUE)
    if not isinstance(record, dict):
        raise _RecordError(ErrorCode.INVALID_EVENT, f"{where} is {_json_type(record)}, expected an object")

    event_name = record.get("eventName")
    if not isinstance(event_name, str):
        raise _RecordError(ErrorCode.INVALID_EVENT, f"{where}.eventName is {_json_type(event_name)}, expected a string")
    if not _is_create_event(event_name):
        raise _Skip(_skip_reason_of_event(event_name))
    if "s3" not in settings.allowed_schemes:
        raise _RecordError(ErrorCode.UNSUPPORTED_SCHEME, "scheme 's3' is not in --allowed-schemes")

    s3 = record.get("s3")
    bucket = _dig(s3, "bucket", "name")
    raw_key = _dig(s3, "object", "key")
    version_id = _dig(s3, "object", "versionId")
    if not isinstance(bucket, str) or not bucket:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"{where}.s3.bucket.name must be a non-empty string")
    if not isinstance(raw_key, str) or not raw_key:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"{where}.s3.object.key must be a non-empty string")
    if version_id is not None and not isinstance(version_id, str):
        raise _RecordError(ErrorCode.INVALID_EVENT, f"{where}.s3.object.versionId must be a string or null")

    key = _decode_notification_key(raw_key, where)
    uri = f"s3://{bucket}/{key}"
    if key.endswith("/"):
        raise _Skip(SKIP_FOLDER)
    _check_key(key, uri)
    # Amazon writes "null" as the version of objects in buckets without versioning.
    if version_id in ("", "null"):
        version_id = None
    return ImageRef(scheme="s3", bucket=bucket, key=key, version_id=version_id)


def _decode_notification_key(raw_key: str, where: str) -> str:
    # Notifications form-encode keys: `+` is a space and `%2B` a literal plus.
    try:
        return urllib.parse.unquote_plus(raw_key, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _RecordError(
            ErrorCode.INVALID_EVENT, f"{where}.s3.object.key {_shorten(raw_key)!r} is not percent-encoded UTF-8"
        ) from None


def _is_create_event(event_name: str) -> bool:
    # Amazon writes "ObjectCreated:Put", MinIO "s3:ObjectCreated:Put".
    return event_name.removeprefix("s3:").startswith("ObjectCreated:")


def _skip_reason_of_event(event_name: str) -> str:
    return SKIP_TEST_EVENT if event_name.removeprefix("s3:") == "TestEvent" else SKIP_NOT_CREATED


def _dig(value: Any, *names: str) -> Any:
    for name in names:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


# Shared checks


def _check_key(key: str, uri: str) -> None:
    size = len(key.encode("utf-8", errors="surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise _RecordError(ErrorCode.INVALID_EVENT, f"object key has {size} bytes, maximum {MAX_KEY_BYTES}", image=_shorten(uri))


def _readable_uri(image_value: Any) -> str | None:
    """Return the image URI of an own event for an error record, or None when it cannot be read."""
    if isinstance(image_value, str) and image_value:
        return _shorten(image_value)
    if isinstance(image_value, dict):
        bucket, key = image_value.get("bucket"), image_value.get("key")
        if isinstance(bucket, str) and isinstance(key, str):
            return _shorten(f"s3://{bucket}/{key}")
    return None


def _shorten(text: str, limit: int = 1100) -> str:
    # A bucket name and the longest key fit, so anything longer would only bloat the error record.
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

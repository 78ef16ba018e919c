"""Fetching images from S3: one boto3 client shared by the fetch threads.

A fetch ends in one of three ways:

- the object's bytes;
- CaptionError for an outcome that is final for this object (not allowed, not found,
  access denied, empty, too large, or a store that serves other objects but keeps
  failing on this one), which the stream dead-letters;
- TransientError when the store itself looks unhealthy (throttling, 5xx responses,
  connection errors or timeouts with no other sign of life), so the stream pauses
  and tries the same message again instead of dead-lettering it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from worker.errors import CaptionError, ErrorCode, TransientError
from worker.events import IMPLEMENTED_SCHEMES, ImageRef
from worker.logs import RepeatLimiter, fields
from worker.metrics import Metrics, s3_error_label
from worker.settings import Settings

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024
# Pause between GETs whose body broke off; botocore's own retries cover the other failures.
DEFAULT_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0
# While the store is unhealthy, store_healthy() probes it at most this often.
DEFAULT_PROBE_INTERVAL_SECONDS = 2.0
# A 403 is logged at ERROR at most this often per bucket; each one is still counted.
ACCESS_DENIED_LOG_INTERVAL_SECONDS = 60.0

# Codes that S3 and compatible stores send when they ask clients to slow down.
_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestThrottledException",
        "BandwidthLimitExceeded",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound"})
# Body failures that a new GET may cure: the connection broke, a read timed out, or the checksum differed.
_BODY_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, FlexibleChecksumError)


@dataclass(frozen=True)
class FetchedObject:
    """Bytes of one object, the seconds the fetch took and the HTTP requests it sent."""

    data: bytes
    fetch_seconds: float
    attempts: int


class _StoreFailure(Exception):
    """A failed GET that reveals nothing about the object: throttling, 5xx, connection or body errors."""

    def __init__(self, label: str, message: str, *, throttled: bool = False, body: bool = False) -> None:
        super().__init__(message)
        self.label = label
        self.message = message
        self.throttled = throttled
        self.body = body


class _StoreHealth:
    """Time of the store's last response and whether it is judged unhealthy, shared by all fetch threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_response = float("-inf")
        self._unhealthy_bucket: str | None = None
        self._last_probe = float("-inf")

    def record_response(self) -> None:
        """Note a response of the store about an object: data, not found or access denied."""
        with self._lock:
            self._last_response = time.monotonic()
            self._unhealthy_bucket = None

    def responded_since(self, moment: float) -> bool:
        with self._lock:
            return self._last_response >= moment

    def mark_unhealthy(self, bucket: str) -> None:
        with self._lock:
            self._unhealthy_bucket = bucket

    def is_healthy(self) -> bool:
        with self._lock:
            return self._unhealthy_bucket is None

    def claim_probe(self, interval_seconds: float) -> str | None:
        """Return the bucket to probe when a probe is due, else None, and note the probe's time."""
        with self._lock:
            now = time.monotonic()
            if self._unhealthy_bucket is None or now - self._last_probe < interval_seconds:
                return None
            self._last_probe = now
            return self._unhealthy_bucket


class Fetcher:
    """Downloads objects from S3 with one thread-safe boto3 client shared by many threads.

    Credentials come from the usual AWS sources (variables, files, web identity,
    container or instance metadata); settings set the endpoint, region, addressing,
    timeouts and attempts.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
        probe_interval_seconds: float = DEFAULT_PROBE_INTERVAL_SECONDS,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backoff_seconds = backoff_seconds
        self._probe_interval_seconds = probe_interval_seconds
        self._allowed_buckets = frozenset(settings.s3_allowed_buckets)
        self._allowed_schemes = IMPLEMENTED_SCHEMES & {scheme.lower() for scheme in settings.allowed_schemes}
        if not self._allowed_buckets:
            logger.warning("no S3 bucket is allowed, so every fetch fails; set --s3-allowed-buckets, or '*' for all")

        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=settings.s3_endpoint_url, config=_client_config(settings, settings.s3_max_attempts)
        )
        # The probe sends one request, because it only checks whether the store responds at all.
        self._probe_client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=_client_config(settings, 1))

        self._health = _StoreHealth()
        self._sends = threading.local()
        self._client.meta.events.register("before-send.s3.GetObject", self._count_send)
        self._denied_logged_at: dict[str, float] = {}
        self._denied_lock = threading.Lock()
        # Every fetch in flight fails the same way during an outage, and again at each retry.
        self._log_limiter = RepeatLimiter()

    def fetch(self, ref: ImageRef) -> FetchedObject:
        """Download one object, retrying throttling, 5xx, connection errors and broken bodies.

        Raises CaptionError for an outcome that is final for this object, and
        TransientError when the store looks unhealthy.
        """
        self._check_allowed(ref)
        started = time.monotonic()
        self._sends.count = 0
        try:
            data = self._fetch_with_retries(ref, started)
        finally:
            attempts = self._sends.count
            if attempts > 1:
                self._metrics.fetch_retries.inc(attempts - 1)

        seconds = time.monotonic() - started
        self._metrics.fetch.observe(seconds)
        self._metrics.image_bytes.observe(len(data))
        return FetchedObject(data=data, fetch_seconds=seconds, attempts=attempts)

    def responded_since(self, moment: float) -> bool:
        """Return True when the store has responded to a fetch or probe at or after `moment` (monotonic seconds)."""
        return self._health.responded_since(moment)

    def store_healthy(self) -> bool:
        """Return False while the store is judged unhealthy, probing it again at most every few seconds."""
        if self._health.is_healthy():
            return True
        bucket = self._health.claim_probe(self._probe_interval_seconds)
        if bucket is None:
            return False
        return self._probe(bucket)

    def close(self) -> None:
        self._client.close()
        self._probe_client.close()

    # Steps of one fetch

    def _check_allowed(self, ref: ImageRef) -> None:
        if ref.scheme not in self._allowed_schemes:
            raise CaptionError(ErrorCode.UNSUPPORTED_SCHEME, f"scheme {ref.scheme!r} of {ref.uri} is not supported")
        if "*" not in self._allowed_buckets and ref.bucket not in self._allowed_buckets:
            raise CaptionError(
                ErrorCode.BUCKET_NOT_ALLOWED,
                f"bucket {ref.bucket!r} is not in --s3-allowed-buckets ({', '.join(sorted(self._allowed_buckets)) or 'none'})",
            )

    def _fetch_with_retries(self, ref: ImageRef, started: float) -> bytes:
        # botocore retries each GET up to s3_max_attempts times. This loop only adds new GETs
        # for a body that broke off, because botocore has returned before the body is read.
        max_gets = self._settings.s3_max_attempts
        for get_number in range(1, max_gets + 1):
            try:
                data = self._get_object(ref)
            except _StoreFailure as failure:
                self._metrics.s3_errors.labels(code=s3_error_label(failure.label)).inc()
                if failure.body and get_number < max_gets:
                    logger.debug("object body broke off, fetching again", extra=_log_fields(ref, failure.label))
                    self._sleep_before_get(get_number)
                    continue
                raise self._judge_store_failure(ref, failure, started) from None
            self._health.record_response()
            return data
        raise AssertionError("unreachable: the last GET returns or raises")

    def _get_object(self, ref: ImageRef) -> bytes:
        params: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id is not None:
            params["VersionId"] = ref.version_id
        try:
            response = self._client.get_object(**params)
        except ClientError as exc:
            raise self._classify_client_error(ref, exc) from None
        except ParamValidationError as exc:
            raise CaptionError(ErrorCode.FETCH_FAILED, f"invalid request for {ref.uri}: {exc}") from None
        except BotoCoreError as exc:
            raise _StoreFailure(_label_of_exception(exc), f"{type(exc).__name__}: {exc}") from None

        body = response["Body"]
        try:
            self._check_size(ref, response.get("ContentLength"))
            return self._read_capped(ref, body)
        finally:
            # Closing without reading drops the connection, so a rejected body is never downloaded.
            body.close()

    def _check_size(self, ref: ImageRef, size: int | None) -> None:
        if size == 0:
            self._health.record_response()
            raise CaptionError(ErrorCode.EMPTY_OBJECT, f"object {ref.uri} is empty (0 bytes)")
        if size is not None and size > self._settings.max_image_bytes:
            self._health.record_response()
            raise CaptionError(
                ErrorCode.OBJECT_TOO_LARGE,
                f"object {ref.uri} has {size} bytes, maximum {self._settings.max_image_bytes} (--max-image-bytes)",
            )

    def _read_capped(self, ref: ImageRef, body: Any) -> bytes:
        # The cap applies even when Content-Length is missing or false.
        limit = self._settings.max_image_bytes
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                chunk = body.read(min(READ_CHUNK_BYTES, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    self._health.record_response()
                    raise CaptionError(
                        ErrorCode.OBJECT_TOO_LARGE,
                        f"object {ref.uri} has more than {limit} bytes (--max-image-bytes)",
                    )
        except _BODY_ERRORS as exc:
            raise _StoreFailure(
                "IncompleteBody", f"body of {ref.uri} broke off after {total} bytes: {exc}", body=True
            ) from None
        if total == 0:
            self._health.record_response()
            raise CaptionError(ErrorCode.EMPTY_OBJECT, f"object {ref.uri} is empty (0 bytes)")
        return b"".join(chunks)

    def _classify_client_error(self, ref: ImageRef, exc: ClientError) -> Exception:
        """Map an S3 error response to a final CaptionError or to a _StoreFailure worth judging."""
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        label = code or str(status)
        message = f"S3 returned {status} {code} for {ref.uri}" + (f" version {ref.version_id}" if ref.version_id else "")

        if code in _THROTTLING_CODES or status == 429:
            return _StoreFailure(label, message, throttled=True)
        if status >= 500 or code in ("InternalError", "RequestTimeout", "ServiceUnavailable"):
            return _StoreFailure(label, message)

        self._metrics.s3_errors.labels(code=s3_error_label(label)).inc()
        self._health.record_response()
        if code in _NOT_FOUND_CODES or status == 404:
            return CaptionError(ErrorCode.IMAGE_NOT_FOUND, message)
        if code == "InvalidObjectState":
            return CaptionError(ErrorCode.FETCH_FAILED, f"{message}: the object is archived and must be restored first")
        if status == 403:
            self._log_access_denied(ref, label)
            return CaptionError(ErrorCode.ACCESS_DENIED, message)
        return CaptionError(ErrorCode.FETCH_FAILED, message)

    def _judge_store_failure(self, ref: ImageRef, failure: _StoreFailure, started: float) -> Exception:
        """Decide whether the object alone fails (fetch_failed) or the store does (TransientError)."""
        if not failure.throttled and (self._health.responded_since(started) or self._probe(ref.bucket)):
            logger.warning("fetch failed while the store serves other requests", extra=_log_fields(ref, failure.label))
            return CaptionError(ErrorCode.FETCH_FAILED, failure.message, retryable=True)

        # Throttling pauses the stream even when the store responds, because the store signals overload.
        self._health.mark_unhealthy(ref.bucket)
        self._log_limiter.log(logger, logging.WARNING, "S3 store unhealthy, pausing",
                              repeat_key=(ref.bucket, failure.label),
                              **_log_values(ref, failure.label))
        return TransientError(f"S3 store unhealthy: {failure.message}")

    def _probe(self, bucket: str) -> bool:
        """Send one HEAD to the bucket and return True when the store responds with anything but throttling or 5xx."""
        try:
            self._probe_client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status >= 500 or status == 429:
                return False
        except BotoCoreError:
            return False
        self._health.record_response()
        return True

    def _sleep_before_get(self, get_number: int) -> None:
        ceiling = min(MAX_BACKOFF_SECONDS, self._backoff_seconds * 2 ** (get_number - 1))
        time.sleep(random.uniform(0, ceiling))

    def _log_access_denied(self, ref: ImageRef, label: str) -> None:
        now = time.monotonic()
        with self._denied_lock:
            if now - self._denied_logged_at.get(ref.bucket, float("-inf")) < ACCESS_DENIED_LOG_INTERVAL_SECONDS:
                return
            self._denied_logged_at[ref.bucket] = now
        logger.error(
            "S3 denied access; check the bucket policy and the worker's credentials",
            extra=_log_fields(ref, label),
        )

    def _count_send(self, **_: Any) -> None:
        # Returns None, because a value returned from before-send would replace the HTTP response.
        self._sends.count = getattr(self._sends, "count", 0) + 1


def _client_config(settings: Settings, max_attempts: int) -> Config:
    return Config(
        region_name=settings.s3_region,
        connect_timeout=settings.s3_connect_timeout_seconds,
        read_timeout=settings.s3_read_timeout_seconds,
        retries={"mode": "adaptive", "total_max_attempts": max_attempts},
        # One connection per fetch thread; botocore's default pool has 10.
        max_pool_connections=max(10, settings.fetch_threads),
        s3={"addressing_style": settings.s3_addressing_style},
        user_agent_extra="caption-worker",
    )


def _label_of_exception(exc: BotoCoreError) -> str:
    if isinstance(exc, ReadTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return "ConnectionError"
    # NoCredentialsError and the like: every fetch fails the same way, so the stream pauses.
    return type(exc).__name__


def _log_values(ref: ImageRef, code: str) -> dict[str, Any]:
    return {"bucket": ref.bucket, "key": ref.key, "version_id": ref.version_id, "code": code}


def _log_fields(ref: ImageRef, code: str) -> dict[str, Any]:
    return fields(**_log_values(ref, code))

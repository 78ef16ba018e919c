"""Log setup: key=value text lines by default, JSON lines with --log-format json.

Modules log with `logger.info("message", extra=fields(topic=..., partition=...))`
so that both formats carry the same fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

_FIELDS_ATTR = "kv_fields"

# A repeated log line is written once, then at most once per this many seconds with a count.
REPEAT_INTERVAL_SECONDS = 30.0
# Keys that RepeatLimiter stores; beyond this, it drops the keys quiet for a whole interval.
REPEAT_MAX_KEYS = 1000
# Numbers in librdkafka's lines (milliseconds, counts, ports) differ between repeats of one problem.
_NUMBERS = re.compile(r"\d+")


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """Return `extra` for a log call that attaches key=value fields."""
    return {_FIELDS_ATTR: values}


def _format_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch in text for ch in ' "='):
        return json.dumps(text, ensure_ascii=False)
    return text


class KeyValueFormatter(logging.Formatter):
    """Format a record as `time level logger message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"{stamp}.{int(record.msecs):03d}Z",
            record.levelname,
            record.name,
            _format_value(record.getMessage()),
        ]
        for key, value in getattr(record, _FIELDS_ATTR, {}).items():
            parts.append(f"{key}={_format_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(getattr(record, _FIELDS_ATTR, {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send all logs to stderr in the chosen format, replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log every retry at INFO; their failures still reach us as exceptions.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RepeatLimiter:
    """Rate limit for repeated log lines: the first of a key at once, then one line per interval with a count.

    A broker or store outage makes the same line repeat many times a second. The
    metrics count every occurrence, so the log only needs to show that it goes on.
    Thread-safe.
    """

    def __init__(self, interval_seconds: float = REPEAT_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [monotonic time of the last written line, repeats dropped since then]
        self._entries: dict[Hashable, list[float | int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """Return None when this repeat of `key` is dropped, else the number of repeats dropped before it."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] < self._interval_seconds:
                entry[1] += 1
                return None
            dropped = int(entry[1]) if entry is not None else 0
            if entry is None and len(self._entries) >= REPEAT_MAX_KEYS:
                self._forget_quiet_keys(now)
            self._entries[key] = [now, 0]
            return dropped

    def log(self, logger: logging.Logger, level: int, message: str, *, repeat_key: Hashable = None,
            **values: Any) -> bool:
        """Log `message` with `values` as fields unless it repeats `repeat_key` (default: the message) too soon.

        A line written after dropped repeats carries their number as `suppressed`.
        Returns whether a line was written.
        """
        dropped = self.admit(message if repeat_key is None else repeat_key)
        if dropped is None:
            return False
        if dropped:
            values["suppressed"] = dropped
        logger.log(level, message, extra=fields(**values))
        return True

    def _forget_quiet_keys(self, now: float) -> None:
        quiet = [key for key, entry in self._entries.items() if now - entry[0] >= self._interval_seconds]
        for key in quiet:
            del self._entries[key]
        if len(self._entries) >= REPEAT_MAX_KEYS:
            # Every key is busy: start over rather than grow without bound.
            self._entries.clear()


class KafkaClientLogger:
    """The `logger` of a confluent-kafka client, which writes librdkafka's log lines in the worker's format.

    With a `logger` in its configuration, confluent-kafka turns on librdkafka's
    `log.queue`, so the lines arrive on the thread that calls poll(), consume() or
    flush() instead of being printed to stderr. Repeats are rate-limited like the worker's own lines.
    """

    def __init__(self, name: str = "librdkafka", limiter: RepeatLimiter | None = None) -> None:
        self._logger = logging.getLogger(name)
        self._limiter = limiter if limiter is not None else RepeatLimiter()

    def log(self, level: int, msg: str, *args: Any) -> None:
        # confluent-kafka 2.16 calls log(level, "%s [%s] %s", facility, client name, text),
        # with the syslog level of the line mapped to a logging level.
        if not self._logger.isEnabledFor(level):
            return
        if len(args) == 3:
            facility, client, text = (str(arg) for arg in args)
        else:
            facility, client, text = "", "", (msg % args if args else msg)
        key = (level, facility, _NUMBERS.sub("#", text))
        self._limiter.log(self._logger, level, text, repeat_key=key, facility=facility, client=client)

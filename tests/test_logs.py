"""Log helpers: repeat rate limits and the librdkafka log adapter, with a fake clock and captured records."""

from __future__ import annotations

import logging

import pytest

from worker.logs import REPEAT_MAX_KEYS, KafkaClientLogger, RepeatLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def kv(record: logging.LogRecord) -> dict:
    return getattr(record, "kv_fields", {})


def test_limiter_admits_first_then_drops_repeats(clock):
    limiter = RepeatLimiter(30.0, clock)

    first = limiter.admit("refused")
    repeats = [limiter.admit("refused") for _ in range(5)]

    assert first == 0
    assert repeats == [None] * 5


def test_limiter_reports_dropped_count_after_interval(clock):
    limiter = RepeatLimiter(30.0, clock)
    limiter.admit("refused")
    for _ in range(7):
        clock.now += 1.0
        limiter.admit("refused")

    clock.now += 30.0
    summary = limiter.admit("refused")
    clock.now += 30.0
    quiet_summary = limiter.admit("refused")

    assert summary == 7
    assert quiet_summary == 0


def test_limiter_keeps_keys_apart(clock):
    limiter = RepeatLimiter(30.0, clock)

    assert limiter.admit(("client error", "_TRANSPORT")) == 0
    assert limiter.admit(("client error", "_ALL_BROKERS_DOWN")) == 0
    assert limiter.admit(("client error", "_TRANSPORT")) is None


def test_limiter_forgets_quiet_keys_when_full(clock):
    limiter = RepeatLimiter(30.0, clock)
    for index in range(REPEAT_MAX_KEYS):
        limiter.admit(index)
    clock.now += 31.0

    limiter.admit("new key")

    assert len(limiter._entries) == 1


def test_limiter_log_adds_suppressed_field(clock, caplog):
    limiter = RepeatLimiter(30.0, clock)
    logger = logging.getLogger("test.repeats")
    caplog.set_level(logging.WARNING, logger="test.repeats")

    for _ in range(4):
        limiter.log(logger, logging.WARNING, "all brokers down", error="refused")
    clock.now += 30.0
    limiter.log(logger, logging.WARNING, "all brokers down", error="refused")

    messages = [(record.getMessage(), kv(record)) for record in caplog.records]
    assert messages == [
        ("all brokers down", {"error": "refused"}),
        ("all brokers down", {"error": "refused", "suppressed": 3}),
    ]


def test_kafka_client_logger_writes_fields(clock, caplog):
    adapter = KafkaClientLogger("test.librdkafka", RepeatLimiter(30.0, clock))
    caplog.set_level(logging.DEBUG, logger="test.librdkafka")
    text = "[thrd:127.0.0.1:9/bootstrap]: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)"

    adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", text)

    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.name == "test.librdkafka"
    assert record.getMessage() == text
    assert kv(record) == {"facility": "FAIL", "client": "rdkafka#consumer-1"}


def test_kafka_client_logger_limits_lines_differing_in_numbers(clock, caplog):
    adapter = KafkaClientLogger("test.librdkafka", RepeatLimiter(30.0, clock))
    caplog.set_level(logging.DEBUG, logger="test.librdkafka")

    for milliseconds in (0, 3, 12):
        adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1",
                    f"Connection refused (after {milliseconds}ms in state CONNECT)")
    adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Disconnected")

    assert [record.getMessage() for record in caplog.records] == [
        "Connection refused (after 0ms in state CONNECT)",
        "Disconnected",
    ]


def test_kafka_client_logger_skips_disabled_levels(clock, caplog):
    adapter = KafkaClientLogger("test.librdkafka", RepeatLimiter(30.0, clock))
    caplog.set_level(logging.INFO, logger="test.librdkafka")

    adapter.log(logging.DEBUG, "%s [%s] %s", "BROKER", "rdkafka#producer-2", "debug detail")

    assert caplog.records == []

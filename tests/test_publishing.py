import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from worker.errors import CaptionError, ErrorCode
from worker.events import ImageRef, ImageRequest
from worker.publishing import (
    SourceMessage,
    build_error_record,
    build_output_record,
    encode_bytes,
    producer_config,
    transactional_id,
)
from worker.settings import load_settings
from worker.stream import consumer_config

TIMINGS = {
    "fetch": 0.01,
    "decode": 0.002,
    "queue": 0.1,
    "time_to_first_token": 0.2,
    "generation": 0.5,
    "total": 0.9,
}


@dataclass
class FakeCaption:
    text: str = "a cat on a mat"
    finish_reason: str = "length"
    generated_tokens: int = 4


def make_source(key=b"k1", value=b'{"image": "s3://b/cat.jpg"}', headers=None):
    return SourceMessage(
        topic="images", partition=3, offset=42, key=key, value=value,
        headers=headers if headers is not None else [("traceparent", b"00-abc-def-01"), ("other", b"x")],
        timestamp_ms=1_700_000_000_000,
    )


def make_request(**overrides):
    values = {"image": ImageRef("s3", "b", "cat.jpg"), "id": "ev-1", "metadata": {"user": 7}}
    values.update(overrides)
    return ImageRequest(**values)


@pytest.fixture
def settings():
    return load_settings(output_topic="out", dlq_topic="dlq", group_id="g")


def test_output_record_fields(settings):
    record = build_output_record(settings, make_source(), make_request(), FakeCaption(), model="tiny", timings=TIMINGS)
    payload = json.loads(record.value)

    assert record.topic == "out"
    assert payload["id"] == "ev-1"
    assert payload["image"] == "s3://b/cat.jpg"
    assert payload["caption"] == "a cat on a mat"
    assert payload["model"] == "tiny"
    assert payload["finish_reason"] == "length"
    assert payload["generated_tokens"] == 4
    assert payload["timings"] == TIMINGS
    assert payload["source"] == {"topic": "images", "partition": 3, "offset": 42}
    assert payload["metadata"] == {"user": 7}
    assert payload["created_at"].endswith("Z")


def test_output_record_copies_only_traceparent(settings):
    record = build_output_record(settings, make_source(), make_request(), FakeCaption(), model="m", timings=TIMINGS)
    assert record.headers == [("traceparent", b"00-abc-def-01")]


def test_output_key_is_input_key(settings):
    record = build_output_record(settings, make_source(), make_request(), FakeCaption(), model="m", timings=TIMINGS)
    assert record.key == b"k1"


@pytest.mark.parametrize("key", [None, b""])
def test_output_key_falls_back_to_uri(settings, key):
    source = make_source(key=key)
    record = build_output_record(settings, source, make_request(), FakeCaption(), model="m", timings=TIMINGS)
    assert record.key == b"s3://b/cat.jpg"


def test_oversized_output_is_output_too_large():
    settings = load_settings(max_output_bytes=1024)
    caption = FakeCaption(text="word " * 400)
    with pytest.raises(CaptionError) as raised:
        build_output_record(settings, make_source(), make_request(), caption, model="m", timings=TIMINGS)
    assert raised.value.code == ErrorCode.OUTPUT_TOO_LARGE


def test_error_record_fields(settings):
    error = CaptionError(ErrorCode.IMAGE_NOT_FOUND, "no such key")
    record = build_error_record(
        settings, make_source(), error, request_id="ev-1", image_uri="s3://b/cat.jpg", attempts=2
    )
    payload = json.loads(record.value)

    assert record.topic == "dlq"
    assert record.key == b"k1"
    assert payload["error"] == {"code": "image_not_found", "message": "no such key", "retryable": False}
    assert payload["source"] == {"topic": "images", "partition": 3, "offset": 42}
    assert payload["attempts"] == 2
    assert payload["id"] == "ev-1"
    assert payload["image"] == "s3://b/cat.jpg"
    assert payload["original"]["key"] == "k1"
    assert payload["original"]["value"] == '{"image": "s3://b/cat.jpg"}'
    assert payload["original"]["headers"] == [
        {"key": "traceparent", "value": "00-abc-def-01"},
        {"key": "other", "value": "x"},
    ]


def test_error_record_base64_for_binary(settings):
    binary = b"\xff\xd8\xff\x00garbage"
    source = make_source(key=b"\x80key", value=binary, headers=[("h", b"\xfe")])
    error = CaptionError(ErrorCode.INVALID_JSON, "not UTF-8")
    record = build_error_record(settings, source, error, request_id=None, image_uri=None, attempts=1)
    original = json.loads(record.value)["original"]

    assert original["value"] == {"base64": base64.b64encode(binary).decode()}
    assert original["key"] == {"base64": base64.b64encode(b"\x80key").decode()}
    assert original["headers"] == [{"key": "h", "value": {"base64": base64.b64encode(b"\xfe").decode()}}]


def test_error_record_null_value_and_no_key(settings):
    source = make_source(key=None, value=None, headers=[])
    error = CaptionError(ErrorCode.INVALID_EVENT, "bad")
    record = build_error_record(settings, source, error, request_id=None, image_uri=None, attempts=1)
    payload = json.loads(record.value)

    assert record.key is None
    assert payload["original"]["value"] is None
    assert payload["id"] is None
    assert payload["image"] is None


def test_error_record_omits_huge_original_value():
    settings = load_settings(max_output_bytes=2048)
    source = make_source(value=b"x" * 5000)
    error = CaptionError(ErrorCode.INVALID_JSON, "not JSON")
    record = build_error_record(settings, source, error, request_id=None, image_uri=None, attempts=1)
    payload = json.loads(record.value)

    assert payload["original"]["value"] == {"omitted_bytes": 5000}
    assert payload["error"]["code"] == "invalid_json"
    assert len(record.value) <= 2048


def test_encode_bytes_cases():
    assert encode_bytes(None) is None
    assert encode_bytes(b"caf\xc3\xa9") == "café"
    assert encode_bytes(b"\xff") == {"base64": "/w=="}


def test_producer_config_enforces_idempotence():
    settings = load_settings(kafka_option={"acks": "1", "linger.ms": "50"})
    config = producer_config(settings)

    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == "50"
    assert "transactional.id" not in config


def test_producer_config_transactional_id():
    settings = load_settings(delivery="exactly-once", transactional_id="replica-0")
    assert producer_config(settings)["transactional.id"] == "replica-0"


def test_transactional_id_defaults_to_group_host_and_process(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "pod-7")
    settings = load_settings(group_id="captions")
    default = transactional_id(settings)

    assert re.fullmatch(rf"captions-pod-7-{os.getpid()}-[0-9a-f]{{8}}", default), default
    assert transactional_id(settings) == default, "one process must keep one id"


def test_transactional_id_differs_between_processes():
    code = "from worker.publishing import transactional_id; from worker.settings import load_settings; " \
           "print(transactional_id(load_settings(group_id='captions')))"
    ids = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    }
    assert len(ids) == 2, ids


def test_consumer_config_defaults():
    settings = load_settings(group_id="g1", bootstrap_servers="127.0.0.1:1")
    config = consumer_config(settings)

    assert config["bootstrap.servers"] == "127.0.0.1:1"
    assert config["group.id"] == "g1"
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["auto.offset.reset"] == "earliest"
    assert "isolation.level" not in config


def test_consumer_config_user_strategy_and_forced_offsets():
    options = {"partition.assignment.strategy": "range", "enable.auto.commit": "true", "group.id": "other"}
    settings = load_settings(group_id="g1", kafka_option=options)
    config = consumer_config(settings)

    assert config["partition.assignment.strategy"] == "range"
    assert config["enable.auto.commit"] is False
    assert config["group.id"] == "g1"


def test_consumer_config_exactly_once_reads_committed():
    settings = load_settings(delivery="exactly-once")
    assert consumer_config(settings)["isolation.level"] == "read_committed"

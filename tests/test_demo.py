"""`caption-worker demo` on the local stack, and the pieces it is made of."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from worker.demo import demo_key
from worker.events import parse_message
from worker.localrun import (
    EventProducer,
    LocalStack,
    OutputReader,
    RunNames,
    UploadedObject,
    encode_event_key,
    free_port,
    percentile,
    s3_event_notification,
    s3_test_event,
)
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_SECONDS = 420


def parse_summary(stdout: str) -> dict[str, str]:
    """Return the rows of the demo's summary table as name -> value."""
    rows = {}
    in_summary = False
    for line in stdout.splitlines():
        if line == "summary":
            in_summary = True
            continue
        if in_summary and line.startswith("  ") and "  " in line.strip():
            name, value = line.strip().split("  ", 1)
            rows[name.strip()] = value.strip()
    return rows


def test_event_key_encoding_matches_amazon() -> None:
    assert encode_event_key("holiday photos/café terrace.jpg") == "holiday+photos/caf%C3%A9+terrace.jpg"
    assert encode_event_key("a+b/c&d.png") == "a%2Bb/c%26d.png"


def test_demo_events_parse_back_to_their_keys(tiny_model_dir) -> None:
    settings = load_settings(model=tiny_model_dir)
    keys = [demo_key(i, Path(f"photo{i}.JPG")) for i in range(6)]

    for key in keys:
        obj = UploadedObject(bucket="demo-bucket", key=key, size=10, etag="0" * 32)
        parsed = parse_message(json.dumps(s3_event_notification(obj)).encode(), default_id="m", settings=settings)
        assert [request.image.key for request in parsed.images] == [key]
        assert parsed.failures == []

    assert any(" " in key for key in keys)
    assert any(not key.isascii() for key in keys)
    test_event = parse_message(json.dumps(s3_test_event("demo-bucket")).encode(), default_id="t", settings=settings)
    assert test_event.skipped == ["test_event"]


def test_percentile_uses_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None


def test_demo_doc_names_worker_log_file() -> None:
    # docs/demo.md gives the log name as a pattern and an example; a real name must fit both.
    shape = re.compile(r"demo-\d{8}-\d{6}-[0-9a-f]{6}-worker\.log")
    doc = (ROOT / "docs" / "demo.md").read_text()

    assert "demo-<date>-<time>-<id>-worker.log" in doc
    examples = re.findall(r"demo-\d[\w-]*-worker\.log", doc)
    assert examples, "docs/demo.md has no example worker log name"
    assert all(shape.fullmatch(example) for example in examples), examples
    assert shape.fullmatch(RunNames.unique("demo").worker_log_name)


def wait_for_client_log(caplog, serve) -> None:
    """Call `serve` until a librdkafka line reaches Python logging, for at most 30 s."""
    deadline = time.monotonic() + 30
    while not any(record.name == "librdkafka" for record in caplog.records):
        assert time.monotonic() < deadline, "no librdkafka line reached Python logging within 30 s"
        serve()
        time.sleep(0.1)


def raw_client_lines(capfd) -> list[str]:
    """Return the stderr lines that librdkafka printed itself, in its `%LEVEL|time|FACILITY|...` form."""
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("%")]


def test_event_producer_logs_through_python(caplog, capfd) -> None:
    # Nothing listens on the port, so librdkafka reports refused connections.
    producer = EventProducer(f"127.0.0.1:{free_port()}", "no-broker")
    with caplog.at_level(logging.WARNING, logger="librdkafka"):
        producer.send("key", b"value")
        wait_for_client_log(caplog, producer.serve_callbacks)
        producer.close(timeout=0)

    assert raw_client_lines(capfd) == []


def test_output_reader_logs_through_python(caplog, capfd) -> None:
    reader = OutputReader(f"127.0.0.1:{free_port()}", ["no-broker"])
    with caplog.at_level(logging.WARNING, logger="librdkafka"):
        wait_for_client_log(caplog, lambda: list(reader.poll(0.1)))
        reader.close()

    assert raw_client_lines(capfd) == []


def fake_stack_module(tmp_path: Path, running: set[str]) -> SimpleNamespace:
    """A stand-in for deploy/local/stack.py whose parts in `running` run already."""
    stopped: list[tuple[str, ...]] = []
    endpoints = SimpleNamespace(
        kafka_bootstrap="127.0.0.1:1", s3_endpoint="http://127.0.0.1:2", prometheus_url="http://127.0.0.1:3"
    )
    return SimpleNamespace(
        PARTS=("kafka", "s3", "prometheus"),
        LOG_DIR=tmp_path / "logs",
        TARGETS_FILE=tmp_path / "targets.json",
        StackError=RuntimeError,
        _read_state=lambda part: {"part": part},
        _process_alive=lambda state: state["part"] in running,
        ensure_running=lambda: endpoints,
        stop=stopped.append,
        stopped=stopped,
    )


def test_local_stack_stops_only_parts_it_started(tmp_path, monkeypatch) -> None:
    module = fake_stack_module(tmp_path, running={"kafka"})
    monkeypatch.setattr("worker.localrun.load_stack_module", lambda: module)
    stack = LocalStack()

    stack.start()
    stopped = stack.stop_started()

    assert stopped == ["s3", "prometheus"]
    assert module.stopped == [("s3", "prometheus")]


def test_local_stack_keeps_other_scrape_targets(tmp_path, monkeypatch) -> None:
    module = fake_stack_module(tmp_path, running={"kafka", "s3", "prometheus"})
    other = [{"targets": ["127.0.0.1:9999"], "labels": {"job": "someone-else"}}]
    module.TARGETS_FILE.write_text(json.dumps(other))
    monkeypatch.setattr("worker.localrun.load_stack_module", lambda: module)
    stack = LocalStack()
    stack.start()

    stack.add_scrape_target("127.0.0.1:1234")
    during = json.loads(module.TARGETS_FILE.read_text())
    stack.remove_scrape_targets()
    after = json.loads(module.TARGETS_FILE.read_text())

    assert {"targets": ["127.0.0.1:1234"], "labels": {"job": "caption-worker"}} in during
    assert after == other
    assert stack.stop_started() == []


@pytest.mark.slow
def test_demo_captions_photos_and_dead_letters_missing(local_stack, worker_env, tiny_model_dir, sample_photos) -> None:
    command = [sys.executable, "-m", "worker", "demo", "--max-new-tokens", "4", "--timeout", "300"]
    completed = subprocess.run(
        command, cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_SECONDS
    )
    summary = parse_summary(completed.stdout)

    assert completed.returncode == 0, f"demo failed:\n{completed.stdout}\n{completed.stderr}"
    assert summary["images"] == str(len(sample_photos) + 1)
    assert summary["captions"] == str(len(sample_photos))
    assert summary["dead-lettered"] == "1"
    assert summary["image_not_found"] == "1"
    assert summary["skipped (test event)"] == "1"
    assert summary["worker metrics"].startswith("http://127.0.0.1:")
    assert summary["Prometheus"] == local_stack.prometheus_url
    assert summary["captions in Prometheus"] == str(len(sample_photos))
    assert "random words" in completed.stderr
    assert "café" in completed.stdout


@pytest.mark.slow
def test_demo_leaves_running_stack_up(local_stack, stack_script, worker_env, tiny_model_dir) -> None:
    """The stack was running before the demo, so the demo must start and stop none of it."""
    command = [sys.executable, "-m", "worker", "demo", "--max-new-tokens", "2", "--timeout", "300"]
    completed = subprocess.run(
        command, cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_SECONDS
    )

    assert completed.returncode == 0, f"demo failed:\n{completed.stdout}\n{completed.stderr}"
    assert "starting the local stack" not in completed.stderr
    assert stack_script.running_endpoints() == local_stack
    targets = json.loads(local_stack.targets_file.read_text())
    assert not any(group.get("labels", {}).get("job") == "caption-worker" for group in targets)

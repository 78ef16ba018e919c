"""The streaming worker end to end: a `caption-worker run` subprocess on the local Kafka and S3 server.

Each test creates its own topics, consumer group and bucket. Volumes stay at tens
of messages with the tiny model and 4 new tokens, so the file runs in minutes on 2 cores.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from worker.cli import EXIT_OK

# Upper bounds for waits; a healthy run finishes far sooner, and each timeout names what was missing.
READY_TIMEOUT_SECONDS = 120.0
RESULTS_TIMEOUT_SECONDS = 240.0
EXIT_TIMEOUT_SECONDS = 90.0


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


@dataclass
class Topics:
    input: str
    output: str
    dlq: str
    group: str
    bucket: str


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode} before ready:\n{self.log_tail()}")
            if http_get(self.url("/readyz"))[0] == 200:
                return
            time.sleep(0.3)
        pytest.fail(f"worker not ready within {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"worker did not exit within {timeout} s after {signal.Signals(sig).name}:\n{self.log_tail()}")


@dataclass
class Results:
    """Records read back from the output and dead-letter topics."""

    outputs: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    output_messages: list = field(default_factory=list)

    def sources(self) -> list[tuple[int, int]]:
        return [(r["source"]["partition"], r["source"]["offset"]) for r in self.outputs + self.errors]


class Stream:
    """One test's topics and bucket, with ways to send events, run workers and read results."""

    def __init__(self, bootstrap: str, topics: Topics, worker_env: dict, s3_client, tmp_path: Path) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.worker_env = worker_env
        self.s3_client = s3_client
        self.tmp_path = tmp_path
        self.workers: list[WorkerProcess] = []
        # (partition, offset) of every event sent, from the delivery reports.
        self.sent: list[tuple[int, int]] = []

    def put_images(self, photos: list[Path], count: int) -> list[str]:
        keys = []
        for index in range(count):
            photo = photos[index % len(photos)]
            key = f"uploads/{index:03d}{photo.suffix}"
            self.s3_client.put_object(Bucket=self.topics.bucket, Key=key, Body=photo.read_bytes())
            keys.append(key)
        return keys

    def own_event(self, key: str, **extra) -> bytes:
        return json.dumps({"image": f"s3://{self.topics.bucket}/{key}", **extra}).encode()

    def send(self, values: list[bytes | None], headers=None) -> list[tuple[int, int]]:
        """Produce `values` with distinct keys and return the (partition, offset) of each, in order."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        placed: list[tuple[int, int] | None] = [None] * len(values)

        def report(index, err, message):
            assert err is None, f"test producer failed: {err}"
            placed[index] = (message.partition(), message.offset())

        first = len(self.sent)
        for index, value in enumerate(values):
            key = f"key-{first + index}".encode()
            callback = functools.partial(report, index)
            producer.produce(self.topics.input, value=value, key=key, headers=headers, on_delivery=callback)
        assert producer.flush(30) == 0, "test producer did not deliver every event within 30 s"
        self.sent.extend(placed)
        return placed

    def start_worker(self, *extra_args: str) -> WorkerProcess:
        port = free_port()
        log_path = self.tmp_path / f"worker-{len(self.workers)}.log"
        command = [
            sys.executable, "-m", "worker", "run",
            "--input-topic", self.topics.input,
            "--output-topic", self.topics.output,
            "--dlq-topic", self.topics.dlq,
            "--group-id", self.topics.group,
            "--s3-allowed-buckets", self.topics.bucket,
            "--max-new-tokens", "4",
            "--metrics-host", "127.0.0.1",
            "--metrics-port", str(port),
            "--commit-interval-seconds", "1",
            "--drain-timeout-seconds", "30",
            "--max-in-flight", "8",
            "--fetch-threads", "2",
            *extra_args,
        ]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env=self.worker_env, stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProcess(process, port, log_path)
        self.workers.append(worker)
        return worker

    def read(self, *, isolation: str = "read_committed", until=None, timeout: float = RESULTS_TIMEOUT_SECONDS,
             settle_seconds: float = 0.0) -> Results:
        """Read both result topics from the start until `until(results)` holds, then `settle_seconds` more."""
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"{self.topics.group}-reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        })
        consumer.subscribe([self.topics.output, self.topics.dlq])
        results = Results()
        deadline = time.monotonic() + timeout
        settle_end = None
        try:
            while time.monotonic() < deadline:
                for message in consumer.consume(num_messages=100, timeout=0.5):
                    if message.error() is not None:
                        continue
                    payload = json.loads(message.value())
                    if message.topic() == self.topics.output:
                        results.outputs.append(payload)
                        results.output_messages.append(message)
                    else:
                        results.errors.append(payload)
                if settle_end is None and (until is None or until(results)):
                    settle_end = time.monotonic() + settle_seconds
                if settle_end is not None and time.monotonic() >= settle_end:
                    return results
        finally:
            consumer.close()
        logs = "\n---\n".join(worker.log_tail(20) for worker in self.workers)
        pytest.fail(
            f"timed out after {timeout} s: {len(set(results.sources()))} of {len(self.sent)} inputs have a record, "
            f"outputs={len(results.outputs)} errors={len(results.errors)}\n{logs}"
        )

    def covers_all_sent(self, results: Results) -> bool:
        return set(self.sent) <= set(results.sources())

    def cleanup(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)


@pytest.fixture
def stream(kafka_bootstrap, make_topic, group_id, bucket, worker_env, s3_client, tiny_model_dir, tmp_path):
    topics = Topics(make_topic(partitions=3), make_topic(), make_topic(), group_id, bucket)
    env = {**worker_env, "CAPTION_MODEL": str(tiny_model_dir)}
    result = Stream(kafka_bootstrap, topics, env, s3_client, tmp_path)
    yield result
    result.cleanup()


def assert_no_duplicates(results: Results) -> None:
    counts = Counter(results.sources())
    duplicated = {source: count for source, count in counts.items() if count > 1}
    assert not duplicated, f"inputs with more than one record: {duplicated}"


# ---------------------------------------------------------------- tests


def test_good_and_bad_events_flow(stream, sample_photos):
    keys = stream.put_images(sample_photos, 4)
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    stream.send([stream.own_event(key, id=f"good-{i}", metadata={"n": i}) for i, key in enumerate(keys)],
                headers=[("traceparent", traceparent)])
    placed = stream.send([
        b"{not json",
        json.dumps({"id": "no-image"}).encode(),
        None,
        stream.own_event("uploads/missing.jpg", id="missing"),
        json.dumps({"image": "http://example.invalid/x.jpg", "id": "bad-scheme"}).encode(),
    ])
    null_offset = placed[2]
    worker = stream.start_worker()
    worker.wait_ready()

    expected = set(stream.sent) - {null_offset}
    results = stream.read(until=lambda r: expected <= set(r.sources()))

    codes = sorted(record["error"]["code"] for record in results.errors)
    assert codes == ["image_not_found", "invalid_event", "invalid_json", "unsupported_scheme"]
    assert sorted(record["id"] for record in results.outputs) == [f"good-{i}" for i in range(4)]
    assert null_offset not in results.sources(), "a null value must be skipped, not dead-lettered"

    output = next(record for record in results.outputs if record["id"] == "good-0")
    assert output["image"] == f"s3://{stream.topics.bucket}/{keys[0]}"
    assert output["metadata"] == {"n": 0}
    assert output["generated_tokens"] >= 1
    assert set(output["timings"]) == {"fetch", "decode", "queue", "time_to_first_token", "generation", "total"}
    assert output["created_at"].endswith("Z")
    assert all(dict(message.headers() or [])["traceparent"] == traceparent for message in results.output_messages)

    missing = next(record for record in results.errors if record["error"]["code"] == "image_not_found")
    assert missing["id"] == "missing"
    assert missing["original"]["value"] == stream.own_event("uploads/missing.jpg", id="missing").decode()
    invalid = next(record for record in results.errors if record["error"]["code"] == "invalid_json")
    assert invalid["original"]["value"] == "{not json"

    status, body = http_get(worker.url("/metrics"))
    assert status == 200
    assert 'caption_worker_skipped_total{reason="null_value"} 1.0' in body
    assert 'caption_worker_failures_total{code="image_not_found"} 1.0' in body
    assert "caption_worker_ready 1.0" in body
    assert http_get(worker.url("/healthz"))[0] == 200

    assert worker.stop() == EXIT_OK


@pytest.mark.slow
def test_sigkill_then_restart_loses_nothing(stream, sample_photos):
    keys = stream.put_images(sample_photos, 30)
    stream.send([stream.own_event(key) for key in keys])
    worker = stream.start_worker()
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 5)
    worker.stop(signal.SIGKILL)

    stream.start_worker().wait_ready()
    results = stream.read(until=stream.covers_all_sent)

    assert results.errors == []
    assert set(stream.sent) <= set(results.sources())


@pytest.mark.slow
def test_sigterm_then_restart_duplicates_nothing(stream, sample_photos):
    keys = stream.put_images(sample_photos, 30)
    stream.send([stream.own_event(key) for key in keys])
    worker = stream.start_worker()
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 5)
    assert worker.stop(signal.SIGTERM) == EXIT_OK

    restarted = stream.start_worker()
    restarted.wait_ready()
    results = stream.read(until=stream.covers_all_sent, settle_seconds=3)

    assert results.errors == []
    assert_no_duplicates(results)
    assert restarted.stop() == EXIT_OK


@pytest.mark.slow
def test_exactly_once_survives_sigkill(stream, sample_photos):
    keys = stream.put_images(sample_photos, 30)
    stream.send([stream.own_event(key) for key in keys])
    worker = stream.start_worker("--delivery", "exactly-once", "--transactional-id", f"{stream.topics.group}-0")
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 5)
    worker.stop(signal.SIGKILL)

    restarted = stream.start_worker("--delivery", "exactly-once", "--transactional-id", f"{stream.topics.group}-0")
    restarted.wait_ready()
    results = stream.read(until=stream.covers_all_sent, settle_seconds=3)

    assert results.errors == []
    assert_no_duplicates(results)
    assert restarted.stop() == EXIT_OK


@pytest.mark.slow
def test_members_join_and_leave_mid_stream(stream, sample_photos):
    keys = stream.put_images(sample_photos, 40)
    stream.send([stream.own_event(key) for key in keys[:20]])
    first = stream.start_worker()
    first.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 3)

    second = stream.start_worker()
    third = stream.start_worker()
    second.wait_ready()
    third.wait_ready()
    stream.send([stream.own_event(key) for key in keys[20:]])
    stream.read(until=lambda r: len(r.outputs) >= 25)
    assert second.stop(signal.SIGTERM) == EXIT_OK

    results = stream.read(until=stream.covers_all_sent)
    assert results.errors == []
    assert set(stream.sent) <= set(results.sources())
    assert first.stop() == EXIT_OK
    assert third.stop() == EXIT_OK

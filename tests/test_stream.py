"""The streaming worker end to end: a `caption-worker run` subprocess on the local Kafka and S3 server.

Each test creates its own topics, consumer group and bucket. Volumes stay at tens
of messages with the tiny model and 4 new tokens, so the file runs in minutes on 2 cores.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import (
    AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType,
)

from http_client import http_get
from worker.cli import EXIT_DRAIN_TIMEOUT, EXIT_ENGINE_STOPPED, EXIT_KAFKA_FATAL, EXIT_OK, EXIT_SIGNAL, EXIT_USAGE
from worker.localrun import create_topics, find_engine_pid, free_port

# Upper bounds for waits. A healthy run finishes far sooner, and each timeout names what was missing.
READY_TIMEOUT_SECONDS = 120.0
RESULTS_TIMEOUT_SECONDS = 240.0
EXIT_TIMEOUT_SECONDS = 90.0


# ---------------------------------------------------------------- helpers


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
            # A killed member leaves the group after this long instead of the default 45 s.
            "--kafka-option", "session.timeout.ms=6000",
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


def wait_for_metric(worker: WorkerProcess, text: str, timeout: float = 30.0) -> str:
    """Return the first line of /metrics that starts with `text`, waiting for it up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in http_get(worker.url("/metrics"))[1].splitlines():
            if line.startswith(text):
                return line
        time.sleep(0.5)
    pytest.fail(f"metric {text} not exported within {timeout} s")


def assert_no_duplicates(results: Results) -> None:
    counts = Counter(results.sources())
    duplicated = {source: count for source, count in counts.items() if count > 1}
    assert not duplicated, f"inputs with more than one record: {duplicated}"


# ---------------------------------------------------------------- startup


def run_worker_to_exit(worker_env: dict, tiny_model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `caption-worker run` with `args` until it exits by itself, and return its exit code and output."""
    env = {**worker_env, "CAPTION_MODEL": str(tiny_model_dir)}
    command = [sys.executable, "-m", "worker", "run", "--metrics-host", "127.0.0.1", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_SECONDS)


def test_invalid_kafka_option_stops_before_model_load(worker_env, tiny_model_dir):
    completed = run_worker_to_exit(
        worker_env, tiny_model_dir, "--metrics-port", str(free_port()), "--kafka-option", "no.such.property=1"
    )

    assert completed.returncode == EXIT_USAGE, completed.stderr
    assert "no.such.property" in completed.stderr
    assert "--kafka-option" in completed.stderr
    assert "model ready" not in completed.stderr, "the Kafka configuration must be checked before the model loads"


def test_unknown_metrics_host_is_usage_error(worker_env, tiny_model_dir):
    completed = run_worker_to_exit(worker_env, tiny_model_dir, "--metrics-host", "999.1.1.1")

    assert completed.returncode == EXIT_USAGE, completed.stderr
    assert "--metrics-host" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_metrics_port_in_use_is_usage_error(worker_env, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_worker_to_exit(worker_env, tiny_model_dir, "--metrics-port", str(port))

    assert completed.returncode == EXIT_USAGE, completed.stderr
    assert "--metrics-port" in completed.stderr
    assert "Address already in use" in completed.stderr
    assert "Traceback" not in completed.stderr


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
    worker = stream.start_worker("--kafka-option", "statistics.interval.ms=500")
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
    assert wait_for_metric(worker, 'caption_worker_consumer_lag{partition="0"}')

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


def test_engine_death_loses_nothing(stream, sample_photos):
    keys = stream.put_images(sample_photos, 30)
    stream.send([stream.own_event(key) for key in keys])
    # Long captions, so that images are in the engine when its process is killed.
    worker = stream.start_worker("--max-new-tokens", "1000", "--ignore-eos")
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 2)
    engine_pid = find_engine_pid(worker.process.pid)
    assert engine_pid is not None
    os.kill(engine_pid, signal.SIGKILL)

    assert worker.process.wait(EXIT_TIMEOUT_SECONDS) == EXIT_ENGINE_STOPPED
    assert "caption engine process stopped unexpectedly" in worker.log_tail(80)

    stream.start_worker().wait_ready()
    results = stream.read(until=stream.covers_all_sent)
    assert results.errors == []
    assert set(stream.sent) <= set(results.sources())


def test_paused_engine_times_out_and_captions_again(stream, sample_photos):
    keys = stream.put_images(sample_photos, 10)
    worker = stream.start_worker("--request-timeout-seconds", "2")
    worker.wait_ready()
    engine_pid = find_engine_pid(worker.process.pid)
    assert engine_pid is not None

    # The deadline runs from the worker's submit, so the images pass it while the engine is
    # paused, and time out when it resumes.
    os.kill(engine_pid, signal.SIGSTOP)
    try:
        stream.send([stream.own_event(key) for key in keys])
        time.sleep(5)
    finally:
        os.kill(engine_pid, signal.SIGCONT)
    results = stream.read(until=stream.covers_all_sent)

    assert results.errors == [], f"a paused engine dead-lettered good images: {results.errors}"
    assert "caption failed, will fetch and caption again" in worker.log_path.read_text()
    assert worker.stop() == EXIT_OK


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


# ---------------------------------------------------------------- S3 outages


class TcpProxy:
    """A loopback TCP proxy that can refuse connections, to take a store away without losing its data."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection, so new connections are refused."""
        assert self._listener is not None
        # shutdown() wakes the thread blocked in accept(); close() alone would leave it accepting.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections.extend([client, upstream])
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def private_s3(tmp_path, worker_env):
    """A moto S3 server of this test alone, behind a TcpProxy, so stopping it disturbs no other test."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=worker_env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while http_get(f"http://127.0.0.1:{port}/")[0] != 200:
        assert process.poll() is None, "moto server exited at startup, see moto.log"
        assert time.monotonic() < deadline, "moto server did not answer within 30 s"
        time.sleep(0.2)
    proxy = TcpProxy(port)
    proxy.start()
    yield process, proxy
    process.send_signal(signal.SIGCONT)
    process.kill()
    process.wait(10)
    log.close()


@pytest.fixture
def outage_stream(kafka_bootstrap, make_topic, group_id, unique_name, worker_env, tiny_model_dir, tmp_path, private_s3):
    _, proxy = private_s3
    endpoint = f"http://127.0.0.1:{proxy.port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=5),
    )
    bucket_name = unique_name("outage-bucket")
    client.create_bucket(Bucket=bucket_name)
    topics = Topics(make_topic(partitions=2), make_topic(), make_topic(), group_id, bucket_name)
    env = {**worker_env, "CAPTION_MODEL": str(tiny_model_dir), "CAPTION_S3_ENDPOINT_URL": endpoint}
    result = Stream(kafka_bootstrap, topics, env, client, tmp_path)
    yield result
    result.cleanup()
    client.close()


OUTAGE_WORKER_ARGS = ("--s3-connect-timeout-seconds", "1", "--s3-read-timeout-seconds", "2", "--s3-max-attempts", "2")


def wait_unready(worker: WorkerProcess, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_get(worker.url("/readyz"))
        if status == 503:
            return body
        time.sleep(0.3)
    pytest.fail(f"worker still ready {timeout} s into the outage:\n{worker.log_tail()}")


def captions_during_s3_outage(log_text: str) -> list[str]:
    """Return the `image captioned` log lines written while the worker reported an S3 outage."""
    captioned = []
    in_outage = False
    for line in log_text.splitlines():
        if "dependency=s3" in line and "outage: intake paused" in line:
            in_outage = True
        elif "dependency=s3" in line and "outage over" in line:
            in_outage = False
        elif in_outage and '"image captioned"' in line:
            captioned.append(line)
    return captioned


def run_outage(stream: Stream, sample_photos, start_outage, end_outage) -> None:
    keys = stream.put_images(sample_photos, 16)
    stream.send([stream.own_event(key) for key in keys[:6]])
    # Debug lines log each caption, so the log shows whether captions flowed while the worker was unready.
    worker = stream.start_worker(*OUTAGE_WORKER_ARGS, "--log-level", "DEBUG")
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 6)

    start_outage()
    stream.send([stream.own_event(key) for key in keys[6:]])
    reason = wait_unready(worker)
    assert "s3" in reason
    assert "caption_worker_ready 0.0" in http_get(worker.url("/metrics"))[1]
    assert http_get(worker.url("/healthz"))[0] == 200, "an S3 outage must not fail the liveness probe"
    time.sleep(3)  # long enough for several retries with backoff

    end_outage()
    results = stream.read(until=stream.covers_all_sent)
    assert results.errors == [], f"dead-lettered during the outage: {results.errors}"
    worker.wait_ready()
    assert worker.stop() == EXIT_OK

    log_text = worker.log_path.read_text(errors="replace")
    assert "outage over: intake resumed" in log_text
    # The first fetch that reaches the store again ends the outage, before its image is captioned.
    assert captions_during_s3_outage(log_text) == []


@pytest.mark.slow
def test_unresponsive_store_pauses_then_resumes(outage_stream, private_s3, sample_photos):
    process, _ = private_s3
    run_outage(
        outage_stream, sample_photos,
        lambda: process.send_signal(signal.SIGSTOP),
        lambda: process.send_signal(signal.SIGCONT),
    )


@pytest.mark.slow
def test_refused_store_pauses_then_resumes(outage_stream, private_s3, sample_photos):
    _, proxy = private_s3
    run_outage(outage_stream, sample_photos, proxy.stop, proxy.start)


# Port 1 on loopback has no listener, so every connection to this S3 endpoint is refused.
UNREACHABLE_S3_ENDPOINT = "http://127.0.0.1:1"
UNREACHABLE_HOLD_SECONDS = 10.0


def log_lines_with(worker: WorkerProcess, *parts: str) -> list[str]:
    log_text = worker.log_path.read_text(errors="replace")
    return [line for line in log_text.splitlines() if all(part in line for part in parts)]


def test_unreachable_store_outage_never_ends(stream):
    stream.send([stream.own_event("uploads/missing.jpg")])
    worker = stream.start_worker(*OUTAGE_WORKER_ARGS, "--s3-endpoint-url", UNREACHABLE_S3_ENDPOINT)

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not log_lines_with(worker, "outage: intake paused", "dependency=s3"):
        assert worker.process.poll() is None, f"worker exited before the outage:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, f"no S3 outage within {READY_TIMEOUT_SECONDS} s:\n{worker.log_tail()}"
        time.sleep(0.3)

    # Several retries with backoff (0.5 s doubling to 4 s) fail within this time.
    time.sleep(UNREACHABLE_HOLD_SECONDS)
    assert log_lines_with(worker, "outage over", "dependency=s3") == []
    assert len(log_lines_with(worker, "outage: intake paused", "dependency=s3")) == 1
    assert http_get(worker.url("/readyz"))[0] == 503
    # The event is retried, never dead-lettered, so the drain cannot finish.
    worker.process.kill()
    worker.process.wait(EXIT_TIMEOUT_SECONDS)


def start_stuck_worker(stream: Stream, process: subprocess.Popen, *extra_args: str) -> WorkerProcess:
    """Start a worker whose images cannot be fetched, because the store stopped responding."""
    keys = stream.put_images([Path(__file__).parent.parent / "worker" / "samples" / "chelsea.jpg"], 4)
    worker = stream.start_worker(*OUTAGE_WORKER_ARGS, *extra_args)
    worker.wait_ready()
    process.send_signal(signal.SIGSTOP)
    stream.send([stream.own_event(key) for key in keys])
    wait_unready(worker)
    return worker


@pytest.mark.slow
def test_drain_timeout_exit_code(outage_stream, private_s3):
    process, _ = private_s3
    worker = start_stuck_worker(outage_stream, process, "--drain-timeout-seconds", "2")
    assert worker.stop(signal.SIGTERM) == EXIT_DRAIN_TIMEOUT


@pytest.mark.slow
def test_second_signal_exits_at_once(outage_stream, private_s3):
    process, _ = private_s3
    worker = start_stuck_worker(outage_stream, process, "--drain-timeout-seconds", "600")
    worker.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert worker.process.poll() is None, "the first signal must wait for the drain"
    assert worker.stop(signal.SIGTERM) == EXIT_SIGNAL


@pytest.mark.slow
def test_fenced_producer_is_fatal(stream, sample_photos):
    keys = stream.put_images(sample_photos, 20)
    transactional = ("--delivery", "exactly-once", "--transactional-id", f"{stream.topics.group}-shared")
    first = stream.start_worker(*transactional)
    first.wait_ready()
    stream.send([stream.own_event(key) for key in keys[:5]])
    stream.read(until=lambda r: len(r.outputs) >= 5)

    # A second replica with the same transactional id fences the first one.
    second = stream.start_worker(*transactional)
    second.wait_ready()
    stream.send([stream.own_event(key) for key in keys[5:]])

    try:
        code = first.process.wait(EXIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fenced worker still running:\n{first.log_tail()}")
    assert code == EXIT_KAFKA_FATAL
    results = stream.read(until=stream.covers_all_sent, settle_seconds=2)
    assert_no_duplicates(results)
    assert second.stop() == EXIT_OK


@pytest.mark.slow
def test_exactly_once_workers_on_one_host_coexist(stream, sample_photos):
    # Without --transactional-id, each process gets its own default id, so neither fences the other.
    keys = stream.put_images(sample_photos, 12)
    first = stream.start_worker("--delivery", "exactly-once")
    second = stream.start_worker("--delivery", "exactly-once")
    first.wait_ready()
    second.wait_ready()
    stream.send([stream.own_event(key) for key in keys])

    results = stream.read(until=stream.covers_all_sent, settle_seconds=2)

    assert results.errors == []
    assert_no_duplicates(results)
    assert first.process.poll() is None, f"first worker exited:\n{first.log_tail()}"
    assert second.process.poll() is None, f"second worker exited:\n{second.log_tail()}"
    assert first.stop() == EXIT_OK
    assert second.stop() == EXIT_OK


def wait_for_metric_value(worker: WorkerProcess, sample: str, expected: float, timeout: float = 30.0) -> None:
    """Wait up to `timeout` seconds until /metrics reports `expected` for `sample`."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [line for line in http_get(worker.url("/metrics"))[1].splitlines() if line.startswith(sample + " ")]
        if lines and float(lines[0].split()[-1]) == expected:
            return
        time.sleep(0.5)
    pytest.fail(f"{sample} is not {expected} after {timeout} s: {lines or 'not exported'}")


@pytest.mark.slow
def test_exactly_once_lag_reaches_zero(stream, sample_photos):
    keys = stream.put_images(sample_photos, 12)
    transactional = ("--delivery", "exactly-once", "--kafka-option", "statistics.interval.ms=500")
    stream.send([stream.own_event(key) for key in keys[:6]])
    first = stream.start_worker(*transactional)
    first.wait_ready()
    stream.read(until=stream.covers_all_sent)
    assert first.stop() == EXIT_OK

    # The restarted consumer reads the committed offsets once, at its assignment, and
    # the transactions after that must still bring its lag down.
    stream.send([stream.own_event(key) for key in keys[6:]])
    second = stream.start_worker(*transactional)
    second.wait_ready()
    stream.read(until=stream.covers_all_sent)

    for partition in sorted({partition for partition, _ in stream.sent}):
        wait_for_metric_value(second, f'caption_worker_consumer_lag{{partition="{partition}"}}', 0.0)
    assert second.stop() == EXIT_OK


def test_partitions_without_messages_report_zero_lag(stream):
    worker = stream.start_worker("--kafka-option", "statistics.interval.ms=500")
    worker.wait_ready()

    for partition in range(3):
        wait_for_metric_value(worker, f'caption_worker_consumer_lag{{partition="{partition}"}}', 0.0)
    assert worker.stop() == EXIT_OK


# ---------------------------------------------------------------- Kafka outages

# Seconds that the broker stays away: longer than the session timeout and the socket timeout below.
BROKER_OUTAGE_SECONDS = 15.0
BROKER_OUTAGE_WORKER_ARGS = (
    # Shorter than the outage, so a loop that stopped polling during it fails the probes.
    "--max-poll-gap-seconds", "10",
    # A request to a frozen broker fails after this long instead of the default 60 s.
    "--kafka-option", "socket.timeout.ms=5000",
    # Broker state reaches the worker through statistics, once a second instead of every 10 s.
    "--kafka-option", "statistics.interval.ms=1000",
)


@pytest.fixture
def private_kafka(stack_script, unique_name):
    """A Kafka node of this test alone (deploy/local/stack.py KafkaNode), which it may stop, freeze and restart."""
    node = stack_script.KafkaNode(unique_name("private-kafka"))
    node.start()
    yield node
    node.remove()


@pytest.fixture
def broker_outage_stream(private_kafka, unique_name, group_id, bucket, worker_env, s3_client, tiny_model_dir, tmp_path):
    topics = Topics(unique_name("outage-images"), unique_name("outage-captions"), unique_name("outage-dlq"),
                    group_id, bucket)
    create_topics(private_kafka.bootstrap, {topics.input: 2, topics.output: 1, topics.dlq: 1})
    env = {**worker_env, "CAPTION_MODEL": str(tiny_model_dir), "CAPTION_BOOTSTRAP_SERVERS": private_kafka.bootstrap}
    result = Stream(private_kafka.bootstrap, topics, env, s3_client, tmp_path)
    yield result
    result.cleanup()


def hold_outage(worker: WorkerProcess, seconds: float) -> list[tuple[int, str]]:
    """Return the /healthz responses, one every half second, while the outage lasts `seconds`."""
    responses = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        responses.append(http_get(worker.url("/healthz")))
        time.sleep(0.5)
    return responses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stopped", "frozen"])
def test_broker_outage_pauses_then_resumes(broker_outage_stream, private_kafka, sample_photos, kind):
    stream = broker_outage_stream
    keys = stream.put_images(sample_photos, 40)
    stream.send([stream.own_event(key) for key in keys])
    worker = stream.start_worker(*BROKER_OUTAGE_WORKER_ARGS)
    worker.wait_ready()
    stream.read(until=lambda r: len(r.outputs) >= 5)

    if kind == "stopped":
        private_kafka.stop()
    else:
        private_kafka.pause()
    reason = wait_unready(worker)
    healthz = hold_outage(worker, BROKER_OUTAGE_SECONDS)
    still_unready = http_get(worker.url("/readyz"))
    if kind == "stopped":
        private_kafka.start()
    else:
        private_kafka.resume()

    assert still_unready[0] == 503
    assert "kafka" in reason or "group" in reason
    # Periodic commits are asynchronous, so a frozen coordinator cannot stop the loop from polling.
    assert all(response == (200, "ok\n") for response in healthz), f"/healthz failed during the outage: {healthz}"
    results = stream.read(until=stream.covers_all_sent)
    assert results.errors == [], f"dead-lettered during the outage: {results.errors}"
    assert set(stream.sent) <= set(results.sources())
    worker.wait_ready()
    assert worker.stop() == EXIT_OK


# ---------------------------------------------------------------- exactly-once abort


def create_topic_with_config(bootstrap: str, name: str, config: dict[str, str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1, config=config)])
    futures[name].result(timeout=30)


def set_topic_config(bootstrap: str, name: str, key: str, value: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
    futures = admin.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])])
    for future in futures.values():
        future.result(timeout=30)


def metric_value(worker: WorkerProcess, sample: str) -> float:
    for line in http_get(worker.url("/metrics"))[1].splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_aborted_transaction_rewinds_and_recovers(stream, sample_photos, unique_name):
    # The broker rejects every output record while the topic's limit is 100 bytes, which fails
    # the transaction; raising the limit lets the rewound messages through.
    output_topic = unique_name("small-captions")
    create_topic_with_config(stream.bootstrap, output_topic, {"max.message.bytes": "100"})
    stream.topics.output = output_topic
    keys = stream.put_images(sample_photos, 6)
    stream.send([stream.own_event(key) for key in keys])
    worker = stream.start_worker("--delivery", "exactly-once", "--transactional-id", f"{stream.topics.group}-0")
    worker.wait_ready()

    deadline = time.monotonic() + RESULTS_TIMEOUT_SECONDS
    aborted = 'caption_worker_transactions_total{result="aborted"}'
    while metric_value(worker, aborted) < 1:
        assert worker.process.poll() is None, f"worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, f"no transaction aborted within {RESULTS_TIMEOUT_SECONDS} s:\n{worker.log_tail()}"
        time.sleep(0.5)
    set_topic_config(stream.bootstrap, output_topic, "max.message.bytes", "1048588")
    results = stream.read(until=stream.covers_all_sent, settle_seconds=3)

    assert results.errors == []
    assert_no_duplicates(results)
    assert worker.process.poll() is None, "an abortable error must not stop the worker"
    assert metric_value(worker, 'caption_worker_transactions_total{result="committed"}') >= 1
    assert worker.stop() == EXIT_OK

"""Run the worker on the local stack: topics, a bucket, S3 events, the worker process and its output.

`caption-worker demo` and `caption-worker bench stream` share these pieces.
Everything here talks only to the loopback endpoints of deploy/local/stack.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

from worker.logs import KafkaClientLogger, fields
from worker.settings import Settings, parse_key_values

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = REPOSITORY_ROOT / "deploy" / "local" / "stack.py"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Dummy credentials: the local S3 server accepts any, and with them boto3 never
# looks for real ones (environment files or an instance metadata address).
LOCAL_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "local-stack",
    "AWS_SECRET_ACCESS_KEY": "local-stack",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
}


class LocalRunError(Exception):
    """A step of a local run failed; the message names the step and what to check."""


# ---------------------------------------------------------------- local stack


@dataclass(frozen=True)
class StackEndpoints:
    """Loopback addresses of the running local stack."""

    kafka_bootstrap: str
    s3_endpoint: str
    prometheus_url: str | None


def load_stack_module() -> ModuleType:
    """Import deploy/local/stack.py by path; it is a script of the repository, not a package module."""
    if not STACK_SCRIPT.is_file():
        raise LocalRunError(
            f"local stack script not found: {STACK_SCRIPT}; run this command from a clone of the repository"
        )
    name = "caption_worker_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, STACK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while its class bodies run.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def photo_paths(directory: Path = SAMPLES_DIR) -> list[Path]:
    """Return the bundled photographs, sorted by name."""
    photos = sorted(p for p in directory.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise LocalRunError(f"no photographs found in {directory}")
    return photos


def unique_suffix() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- Kafka and S3


def client_config(bootstrap: str, **properties: Any) -> dict[str, Any]:
    """Return the configuration of a helper Kafka client, whose librdkafka lines go through Python logging.

    Without a `logger`, librdkafka prints its lines (`%3|...|FAIL|...` once the
    broker is gone) straight to stderr, in the middle of the command's output.
    """
    return {"bootstrap.servers": bootstrap, **properties, "logger": KafkaClientLogger()}


def create_topics(bootstrap: str, partitions_by_topic: dict[str, int], timeout: float = 30.0) -> None:
    """Create topics with replication factor 1 and wait until the broker confirms each."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_config(bootstrap))
    new_topics = [NewTopic(name, num_partitions=count, replication_factor=1) for name, count in partitions_by_topic.items()]
    for name, future in admin.create_topics(new_topics, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except Exception as exc:
            raise LocalRunError(f"creating topic {name} on {bootstrap} failed: {exc}") from exc


def delete_topics(bootstrap: str, topics: Sequence[str], timeout: float = 30.0) -> None:
    """Delete topics; failures are logged, because this runs during cleanup."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(client_config(bootstrap))
    for name, future in admin.delete_topics(list(topics), operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except Exception as exc:
            logger.warning("deleting topic failed: %s", exc, extra=fields(topic=name))


def make_s3_client(endpoint: str) -> Any:
    """Return a boto3 S3 client for the local S3 server, with dummy credentials and path-style URLs."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=LOCAL_AWS_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_AWS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        region_name=LOCAL_AWS_ENVIRONMENT["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def delete_bucket(s3: Any, bucket: str) -> None:
    """Delete every object of `bucket`, then the bucket; failures are logged, because this runs during cleanup."""
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        s3.delete_bucket(Bucket=bucket)
    except Exception as exc:
        logger.warning("deleting bucket %s failed: %s", bucket, exc)


@dataclass(frozen=True)
class UploadedObject:
    """An object put on the S3 server, with what an event notification reports about it."""

    bucket: str
    key: str
    size: int
    etag: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def upload_photo(s3: Any, bucket: str, key: str, path: Path) -> UploadedObject:
    data = path.read_bytes()
    response = s3.put_object(Bucket=bucket, Key=key, Body=data)
    return UploadedObject(bucket=bucket, key=key, size=len(data), etag=response["ETag"].strip('"'))


def encode_event_key(key: str) -> str:
    """Encode an object key as Amazon S3 writes it in event notifications.

    Amazon form-encodes the key: a space becomes `+`, other reserved and
    non-ASCII bytes become %XX of their UTF-8 encoding, and `/` stays as is.
    """
    return quote_plus(key, safe="/")


def s3_event_notification(obj: UploadedObject, *, event_time: datetime | None = None) -> dict[str, Any]:
    """Build an Amazon S3 `ObjectCreated:Put` event notification for one object."""
    when = event_time or datetime.now(timezone.utc)
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": LOCAL_AWS_ENVIRONMENT["AWS_DEFAULT_REGION"],
                "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
                "eventName": "ObjectCreated:Put",
                "userIdentity": {"principalId": "AWS:LOCALSTACKUSER"},
                "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                "responseElements": {"x-amz-request-id": uuid.uuid4().hex[:16].upper()},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "caption-worker-local",
                    "bucket": {
                        "name": obj.bucket,
                        "ownerIdentity": {"principalId": "LOCALSTACKOWNER"},
                        "arn": f"arn:aws:s3:::{obj.bucket}",
                    },
                    "object": {
                        "key": encode_event_key(obj.key),
                        "size": obj.size,
                        "eTag": obj.etag,
                        "sequencer": f"{time.time_ns():016X}",
                    },
                },
            }
        ]
    }


def s3_test_event(bucket: str) -> dict[str, Any]:
    """Build the `s3:TestEvent` message that Amazon sends when notifications are configured."""
    return {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "Bucket": bucket,
        "RequestId": uuid.uuid4().hex[:16].upper(),
    }


@dataclass
class ProducedEvent:
    """An input event and, once the broker acknowledged it, where it landed and when."""

    key: str
    partition: int = -1
    offset: int = -1
    timestamp: float | None = None


class EventProducer:
    """A producer of input events that records each event's partition, offset and broker timestamp."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self._producer = Producer(client_config(bootstrap, **{"enable.idempotence": True, "linger.ms": 5}))
        self.events: list[ProducedEvent] = []
        self.failures: list[str] = []

    def send(self, key: str, value: dict[str, Any] | bytes) -> None:
        event = ProducedEvent(key=key)
        payload = value if isinstance(value, bytes) else json.dumps(value).encode()

        def on_delivery(error: Any, message: Any) -> None:
            if error is not None:
                self.failures.append(f"{key}: {error}")
                return
            event.partition = message.partition()
            event.offset = message.offset()
            event.timestamp = message.timestamp()[1] / 1000.0

        self._producer.produce(self.topic, key=key.encode(), value=payload, on_delivery=on_delivery)
        self.events.append(event)
        self._producer.poll(0)

    def serve_callbacks(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every acknowledgement; raise LocalRunError if any event was not delivered."""
        remaining = self._producer.flush(timeout)
        if remaining or self.failures:
            raise LocalRunError(
                f"publishing events to {self.topic} failed: {remaining} not acknowledged, errors: {self.failures[:3]}"
            )

    def timestamps_by_offset(self) -> dict[tuple[int, int], float]:
        return {(e.partition, e.offset): e.timestamp for e in self.events if e.timestamp is not None}

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` seconds for outstanding events, drop the rest, and close the producer.

        Call it before the broker stops, or librdkafka keeps reconnecting until the process exits.
        """
        if self._producer.flush(timeout):
            self._producer.purge()
        self._producer.close()


@dataclass(frozen=True)
class OutputRecord:
    """A caption record or an error record read back from the output or dead-letter topic."""

    topic: str
    value: dict[str, Any]
    timestamp: float

    @property
    def is_error(self) -> bool:
        return "error" in self.value

    @property
    def source_position(self) -> tuple[int, int]:
        source = self.value.get("source") or {}
        return int(source.get("partition", -1)), int(source.get("offset", -1))


class OutputReader:
    """A consumer of the output and dead-letter topics, from their beginning, that never commits."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"caption-worker-reader-{uuid.uuid4().hex[:8]}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    # Exactly-once runs abort transactions; only committed records count.
                    "isolation.level": "read_committed",
                },
            )
        )
        self._consumer.subscribe(list(topics))

    def poll(self, timeout: float) -> Iterator[OutputRecord]:
        """Yield the records that arrive within `timeout` seconds (at most 500 per call)."""
        for message in self._consumer.consume(num_messages=500, timeout=timeout):
            if message.error() is not None:
                logger.warning("reading output failed: %s", message.error())
                continue
            try:
                value = json.loads(message.value())
            except (TypeError, ValueError):
                logger.warning("output record is not JSON: topic=%s offset=%s", message.topic(), message.offset())
                continue
            yield OutputRecord(topic=message.topic(), value=value, timestamp=message.timestamp()[1] / 1000.0)

    def close(self) -> None:
        self._consumer.close()


# ---------------------------------------------------------------- the worker process


def settings_environment(args: Any) -> dict[str, str]:
    """Return CAPTION_* variables for the settings flags given on the command line.

    With them the worker process runs with the flags of the command that starts it.
    Settings without a flag keep their CAPTION_* variable or their default.
    """
    environment = {}
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "kafka_option":
            value = json.dumps(parse_key_values(value))
        elif isinstance(value, list):
            value = json.dumps(value)
        environment[f"CAPTION_{name.upper()}"] = str(value)
    return environment


class WorkerProcess:
    """`caption-worker run` as a child process, with its logs in a file and its /proc figures at hand."""

    def __init__(self, environment: dict[str, str], log_path: Path, metrics_port: int) -> None:
        self.log_path = log_path
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float) -> None:
        """Poll /readyz until it passes; raise LocalRunError if the worker exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalRunError(
                    f"the worker exited with code {self.process.returncode} before it was ready; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if http_status(f"{self.metrics_url}/readyz") == 200:
                return
            time.sleep(0.5)
        raise LocalRunError(f"the worker was not ready within {timeout:.0f} s; last log lines:\n{self.log_tail()}")

    def engine_pid(self) -> int | None:
        """Return the pid of the worker's caption engine process, or None while it has none."""
        return find_engine_pid(self.pid)

    def rss_bytes(self) -> int | None:
        """Return the resident memory of the worker and its engine process together."""
        return _sum_over_tree(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int | None:
        """Return the sum of each process's peak: an upper bound, as the two peaks may come at different times."""
        return _sum_over_tree(self.pid, "VmHWM")

    def stop(self, timeout: float = 60.0) -> int:
        """Send SIGTERM and wait for the ordered shutdown; SIGKILL after `timeout` seconds. Return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the worker did not stop within %.0f s after SIGTERM; killing it", timeout)
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def read_proc_status_bytes(pid: int, field_name: str) -> int | None:
    """Return a `kB` field of /proc/PID/status in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Return the pids of a process's children, from /proc/PID/task/*/children."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children.extend(int(value) for value in listing.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return sorted(children)


def find_engine_pid(worker_pid: int) -> int | None:
    """Return the pid of a worker's caption engine process, or None while it has none."""
    for child in child_pids(worker_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                # multiprocessing also starts a resource tracker; the engine is the spawned process.
                if b"spawn_main" in cmdline.read():
                    return child
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


def _sum_over_tree(pid: int, field_name: str) -> int | None:
    own = read_proc_status_bytes(pid, field_name)
    if own is None:
        return None
    return own + sum(read_proc_status_bytes(child, field_name) or 0 for child in child_pids(pid))


def read_proc_cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of a process from /proc/PID/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the command name, which is in brackets and may contain spaces.
            after_name = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    user_ticks, system_ticks = int(after_name[11]), int(after_name[12])
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def read_machine_busy_seconds() -> float:
    """Return the CPU seconds that all cores spent outside idle and I/O wait since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle_ticks = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle_ticks) / os.sysconf("SC_CLK_TCK")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Return the HTTP status of a GET on a loopback URL, or None when the connection fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def worker_environment(
    endpoints: StackEndpoints, overrides: dict[str, str], *, base: dict[str, str] | None = None
) -> dict[str, str]:
    """Return the environment of a worker process on the local stack: dummy AWS credentials, then `overrides`."""
    environment = dict(os.environ if base is None else base)
    environment.update(LOCAL_AWS_ENVIRONMENT)
    environment.update(
        {
            "CAPTION_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "CAPTION_S3_ENDPOINT_URL": endpoints.s3_endpoint,
            "CAPTION_S3_ADDRESSING_STYLE": "path",
            "CAPTION_METRICS_HOST": "127.0.0.1",
        }
    )
    environment.update(overrides)
    return environment


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Return the nearest-rank percentile of `values`, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100.0 * len(ordered)))
    return ordered[rank - 1]


class LocalStack:
    """The local stack of deploy/local/stack.py, as used by one command run.

    It remembers which parts this run started, so that cleanup stops those and
    leaves alone the parts that were already running for someone else.
    """

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self.endpoints: StackEndpoints | None = None
        self.started_parts: list[str] = []
        self._targets: list[str] = []

    def start(self) -> StackEndpoints:
        """Start the parts that are not running and return the endpoints of the whole stack."""
        module = self._module = load_stack_module()
        self.started_parts = [part for part in module.PARTS if not self._part_running(part)]
        if self.started_parts:
            print(f"starting the local stack: {', '.join(self.started_parts)}", file=sys.stderr, flush=True)
        try:
            endpoints = module.ensure_running()
        except module.StackError as exc:
            raise LocalRunError(f"starting the local stack failed: {exc}") from exc
        self.endpoints = StackEndpoints(
            kafka_bootstrap=endpoints.kafka_bootstrap,
            s3_endpoint=endpoints.s3_endpoint,
            prometheus_url=endpoints.prometheus_url,
        )
        return self.endpoints

    def _part_running(self, part: str) -> bool:
        return self._running_state(part) is not None

    def part_pid(self, part: str) -> int | None:
        """Return the process id of a running stack part ("kafka", "s3" or "prometheus"), else None."""
        state = self._running_state(part)
        pid = state.get("pid") if state is not None else None
        return int(pid) if pid else None

    def _running_state(self, part: str) -> dict[str, Any] | None:
        # NOTE: stack.py has no public per-part status, so this reads its state the
        # way its own `status` command does.
        assert self._module is not None
        state = self._module._read_state(part)
        if state is None or not self._module._process_alive(state):
            return None
        return state

    def log_dir(self) -> Path:
        directory = self._module.LOG_DIR if self._module is not None else REPOSITORY_ROOT / ".stack" / "logs"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def add_scrape_target(self, host_port: str, job: str = "caption-worker") -> None:
        """Add a target to Prometheus' file_sd list, keeping the targets that others listed."""
        groups = self._read_targets()
        groups.append({"targets": [host_port], "labels": {"job": job}})
        self._write_targets(groups)
        self._targets.append(host_port)

    def remove_scrape_targets(self) -> None:
        """Remove the targets that this run added."""
        if not self._targets or self._module is None:
            return
        groups = [g for g in self._read_targets() if not set(g.get("targets", [])) & set(self._targets)]
        self._write_targets(groups)
        self._targets.clear()

    def _read_targets(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self._module.TARGETS_FILE.read_text())
        except (FileNotFoundError, ValueError):
            return []

    def _write_targets(self, groups: list[dict[str, Any]]) -> None:
        # Prometheus may read the file at any moment, so it is replaced in one rename.
        path: Path = self._module.TARGETS_FILE
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(groups, indent=2) + "\n")
        temporary.replace(path)

    def stop_started(self) -> list[str]:
        """Stop the parts that `start` started and return their names."""
        stopped = list(self.started_parts)
        if stopped and self._module is not None:
            self._module.stop(tuple(stopped))
        self.started_parts = []
        return stopped


@dataclass(frozen=True)
class RunNames:
    """Topic, consumer group and bucket names of one run, unique through `prefix`."""

    prefix: str

    @classmethod
    def unique(cls, kind: str) -> RunNames:
        return cls(f"{kind}-{unique_suffix()}")

    @property
    def input_topic(self) -> str:
        return f"{self.prefix}-images"

    @property
    def output_topic(self) -> str:
        return f"{self.prefix}-captions"

    @property
    def dlq_topic(self) -> str:
        return f"{self.prefix}-dlq"

    @property
    def group(self) -> str:
        return self.prefix

    @property
    def bucket(self) -> str:
        return self.prefix

    @property
    def worker_log_name(self) -> str:
        return f"{self.prefix}-worker.log"


def start_worker(
    args: Any, endpoints: StackEndpoints, names: RunNames, log_dir: Path, extra: dict[str, str] | None = None
) -> WorkerProcess:
    """Start `caption-worker run` on the run's topics and bucket, with the command's settings flags and `extra`."""
    metrics_port = free_port()
    overrides = settings_environment(args) | {
        "CAPTION_INPUT_TOPIC": names.input_topic,
        "CAPTION_OUTPUT_TOPIC": names.output_topic,
        "CAPTION_DLQ_TOPIC": names.dlq_topic,
        "CAPTION_GROUP_ID": names.group,
        # pydantic-settings reads list settings from the environment as JSON.
        "CAPTION_S3_ALLOWED_BUCKETS": json.dumps([names.bucket]),
        "CAPTION_METRICS_PORT": str(metrics_port),
    }
    overrides |= extra or {}
    return WorkerProcess(worker_environment(endpoints, overrides), log_dir / names.worker_log_name, metrics_port)

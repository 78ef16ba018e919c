"""`caption-worker demo`: the worker captions the bundled photographs on a local stack.

The demo runs these steps in order and always runs the cleanup steps:
1. start the local stack (Kafka, the S3 server, Prometheus), reusing the parts already running;
2. create unique topics (input with 3 partitions, output, dead-letter) and a bucket;
3. upload the photographs under keys with spaces and non-ASCII letters;
4. start `caption-worker run` as a child process, add it to Prometheus' scrape targets, wait until it is ready;
5. publish one Amazon S3 event notification per photograph, one test event and one event for a missing object;
6. print each caption and error record as it arrives, then a summary table.
Cleanup: close the event producer, stop the worker with SIGTERM, remove its scrape target, delete the topics and the bucket when
the stack stays up for someone else, and stop the stack parts that step 1 started (unless --keep-stack).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from worker.localrun import (
    EventProducer,
    LocalRunError,
    LocalStack,
    OutputReader,
    OutputRecord,
    UploadedObject,
    RunNames,
    WorkerProcess,
    create_topics,
    delete_bucket,
    delete_topics,
    http_text,
    make_s3_client,
    percentile,
    photo_paths,
    s3_event_notification,
    s3_test_event,
    start_worker,
    upload_photo,
)
from worker.logs import configure_logging
from worker.settings import DEFAULT_MODEL_DIR, Settings, SettingsError, load_settings

logger = logging.getLogger(__name__)

INPUT_PARTITIONS = 3
DEFAULT_TIMEOUT_SECONDS = 600.0
WORKER_STOP_TIMEOUT_SECONDS = 90.0
# Captions are cut to this length on screen; the output topic has them whole.
MAX_SHOWN_CAPTION_CHARS = 160

# Folders and words for object keys, so that the events carry spaces, `+` encoding and UTF-8.
KEY_FOLDERS = ("holiday photos", "été 2024", "Familienfotos/Großeltern")
KEY_WORDS = ("café terrace", "crème brûlée", "Straße am Fluss", "smörgåsbord", "piñata", "naïve façade")

TINY_MODEL_NOTICE = (
    "note: the bundled tiny test model has random weights, so its captions are random words; "
    "run `caption-worker demo --model DIR` with a Gemma 3 OpenVINO export for real captions (docs/demo.md)"
)


@dataclass
class DemoResult:
    """Observations of one demo run, for the summary table and for tests."""

    images: int = 0
    captions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: float | None = None
    throughput: float | None = None
    latency_p50: float | None = None
    latency_p95: float | None = None
    metrics_url: str = ""
    prometheus_url: str | None = None
    prometheus_captions: float | None = None
    worker_exit_code: int | None = None
    stack_started: list[str] = field(default_factory=list)
    stack_stopped: list[str] = field(default_factory=list)

    @property
    def dead_lettered_by_code(self) -> dict[str, int]:
        return dict(Counter(record["error"]["code"] for record in self.errors))


def demo_key(index: int, photo: Path) -> str:
    """Return an object key such as `holiday photos/astronaut café terrace.jpg` for the index-th photograph."""
    folder = KEY_FOLDERS[index % len(KEY_FOLDERS)]
    word = KEY_WORDS[index % len(KEY_WORDS)]
    return f"{folder}/{photo.stem} {word}{photo.suffix.lower()}"


class Progress:
    """A progress bar on a terminal's stderr, redrawn below the lines printed on stdout.

    When stderr is not a terminal the bar is left out, and each printed line carries the count.
    """

    def __init__(self, total: int, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self._out = out
        self._err = err
        self._bar = err.isatty()

    def line(self, text: str) -> None:
        self.done += 1
        if self._bar:
            self._err.write("\r\033[K")
            self._err.flush()
        self._out.write(f"[{self.done}/{self.total}] {text}\n")
        self._out.flush()
        self.draw()

    def draw(self) -> None:
        if not self._bar:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        self._err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} images")
        self._err.flush()

    def finish(self) -> None:
        if self._bar:
            self._err.write("\r\033[K")
            self._err.flush()


def describe_record(record: OutputRecord) -> str:
    value = record.value
    if record.is_error:
        error = value["error"]
        return f"dead-lettered {value.get('image') or '?'}: {error['code']}: {error['message']}"
    caption = value["caption"]
    if len(caption) > MAX_SHOWN_CAPTION_CHARS:
        caption = caption[: MAX_SHOWN_CAPTION_CHARS - 3] + "..."
    return f"{value['image']}: {caption!r}"


def run_demo(args: argparse.Namespace, settings: Settings, *, out: TextIO = sys.stdout) -> DemoResult:
    """Run the demo steps listed in the module docstring and return what was observed."""
    names = RunNames.unique("demo")
    topics = [names.input_topic, names.output_topic, names.dlq_topic]
    result = DemoResult()
    timeout = float(getattr(args, "timeout", None) or DEFAULT_TIMEOUT_SECONDS)
    keep_stack = bool(getattr(args, "keep_stack", False))

    stack = LocalStack()
    worker: WorkerProcess | None = None
    producer: EventProducer | None = None
    s3 = None
    try:
        endpoints = stack.start()
        result.stack_started = list(stack.started_parts)
        result.prometheus_url = endpoints.prometheus_url
        print(f"local stack: kafka={endpoints.kafka_bootstrap} s3={endpoints.s3_endpoint}", file=out)

        partitions = {names.input_topic: INPUT_PARTITIONS, names.output_topic: 1, names.dlq_topic: 1}
        create_topics(endpoints.kafka_bootstrap, partitions)
        s3 = make_s3_client(endpoints.s3_endpoint)
        s3.create_bucket(Bucket=names.bucket)
        photos = photo_paths()
        uploaded = [upload_photo(s3, names.bucket, demo_key(i, photo), photo) for i, photo in enumerate(photos)]
        result.images = len(uploaded) + 1
        print(f"uploaded {len(uploaded)} photographs to s3://{names.bucket}/", file=out)

        worker = start_worker(args, endpoints, names, stack.log_dir())
        result.metrics_url = f"{worker.metrics_url}/metrics"
        instance = worker.metrics_url.removeprefix("http://")
        stack.add_scrape_target(instance)
        print(f"worker started (pid {worker.pid}, log {worker.log_path}); loading the model", file=out)
        worker.wait_ready(timeout)

        producer = publish_demo_events(endpoints.kafka_bootstrap, names.input_topic, names.bucket, uploaded)
        collect_records(endpoints.kafka_bootstrap, topics[1:], producer, worker, result, timeout, out)
        result.skipped = read_skipped_total(worker.metrics_url)
        if endpoints.prometheus_url:
            result.prometheus_captions = wait_for_prometheus_captions(
                endpoints.prometheus_url, instance, len(result.captions)
            )
    finally:
        # Kafka clients close before the stack parts stop, so none of them logs a refused connection.
        if producer is not None:
            producer.close()
        if worker is not None:
            result.worker_exit_code = worker.stop(WORKER_STOP_TIMEOUT_SECONDS)
        stack.remove_scrape_targets()
        if keep_stack:
            print(f"kept the stack, topics {' '.join(topics)} and bucket {names.bucket}", file=out)
        else:
            if not stack.started_parts and stack.endpoints is not None:
                # The stack belongs to someone else and stays up: leave it as the demo found it.
                delete_topics(stack.endpoints.kafka_bootstrap, topics)
                if s3 is not None:
                    delete_bucket(s3, names.bucket)
            result.stack_stopped = stack.stop_started()
    return result


def publish_demo_events(
    bootstrap: str, topic: str, bucket: str, uploaded: list[UploadedObject]
) -> EventProducer:
    """Publish one S3 event per uploaded photograph, a test event and an event for a missing object."""
    producer = EventProducer(bootstrap, topic)
    producer.send("s3-test-event", s3_test_event(bucket))
    for obj in uploaded:
        producer.send(obj.uri, s3_event_notification(obj))
    missing = UploadedObject(bucket=bucket, key="holiday photos/deleted café.jpg", size=1024, etag="0" * 32)
    producer.send(missing.uri, s3_event_notification(missing))
    producer.flush()
    return producer


def collect_records(
    bootstrap: str,
    topics: list[str],
    producer: EventProducer,
    worker: WorkerProcess,
    result: DemoResult,
    timeout: float,
    out: TextIO,
) -> None:
    """Read caption and error records until every image has one, printing each; fill in `result`.

    Raises LocalRunError when the worker exits or `timeout` seconds pass first.
    """
    reader = OutputReader(bootstrap, topics)
    progress = Progress(result.images, out=out)
    records: list[OutputRecord] = []
    deadline = time.monotonic() + timeout
    try:
        progress.draw()
        while len(records) < result.images:
            if worker.process.poll() is not None:
                raise LocalRunError(
                    f"the worker exited with code {worker.process.returncode} after {len(records)} of "
                    f"{result.images} records; last log lines:\n{worker.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise LocalRunError(
                    f"timed out after {timeout:.0f} s with {len(records)} of {result.images} records; "
                    f"raise --timeout for a slow model; last worker log lines:\n{worker.log_tail()}"
                )
            for record in reader.poll(0.5):
                records.append(record)
                progress.line(describe_record(record))
    finally:
        progress.finish()
        reader.close()

    result.captions = [r.value for r in records if not r.is_error]
    result.errors = [r.value for r in records if r.is_error]
    sent_at = producer.timestamps_by_offset()
    latencies = [r.timestamp - sent_at[r.source_position] for r in records if r.source_position in sent_at]
    result.latency_p50 = percentile(latencies, 50)
    result.latency_p95 = percentile(latencies, 95)
    first_event = min(sent_at.values())
    last_record = max(r.timestamp for r in records)
    if last_record > first_event:
        result.throughput = len(records) / (last_record - first_event)


def read_skipped_total(metrics_url: str) -> float | None:
    """Return caption_worker_skipped_total summed over reasons from the worker's /metrics, or None."""
    try:
        text = http_text(f"{metrics_url}/metrics")
    except OSError as exc:
        logger.warning("reading the worker's metrics failed: %s", exc)
        return None
    pattern = re.compile(r"^caption_worker_skipped_total(\{[^}]*\})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(match.group(2)) for match in pattern.finditer(text))


def wait_for_prometheus_captions(
    prometheus_url: str, instance: str, expected: int, timeout: float = 15.0
) -> float | None:
    """Return the worker's caption_worker_captions_total as Prometheus scraped it.

    Polls until the value reaches `expected` or `timeout` seconds pass. `instance` is the
    worker's host:port, which Prometheus puts in the instance label of its scrape target.
    """
    query = urllib.parse.urlencode({"query": f'caption_worker_captions_total{{instance="{instance}"}}'})
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            samples = json.loads(http_text(f"{prometheus_url}/api/v1/query?{query}"))["data"]["result"]
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("querying Prometheus failed: %s", exc)
            return None
        if samples:
            value = float(samples[0]["value"][1])
            if value >= expected:
                break
        time.sleep(1.0)
    return value


def format_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def prometheus_location(result: DemoResult) -> str:
    if not result.prometheus_url:
        return "not running"
    if "prometheus" in result.stack_stopped:
        return f"{result.prometheus_url} (stopped with the stack; --keep-stack keeps it)"
    return result.prometheus_url


def print_summary(result: DemoResult, out: TextIO) -> None:
    rows: list[tuple[str, str]] = [
        ("images", str(result.images)),
        ("captions", str(len(result.captions))),
        ("dead-lettered", str(len(result.errors))),
    ]
    rows += [(f"  {code}", str(count)) for code, count in sorted(result.dead_lettered_by_code.items())]
    rows += [
        ("skipped (test event)", "n/a" if result.skipped is None else f"{result.skipped:.0f}"),
        ("throughput", "n/a" if result.throughput is None else f"{result.throughput:.2f} images/s"),
        ("latency p50", format_seconds(result.latency_p50)),
        ("latency p95", format_seconds(result.latency_p95)),
        ("worker metrics", f"{result.metrics_url} (up until the demo stops the worker)"),
        ("Prometheus", prometheus_location(result)),
        ("captions in Prometheus", "n/a" if result.prometheus_captions is None else f"{result.prometheus_captions:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\nsummary", file=out)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}", file=out)
    print(
        "  throughput counts from the first event to the last record; latency is from each event's "
        "broker timestamp to its output record's",
        file=out,
    )
    if result.prometheus_url and "prometheus" not in result.stack_stopped:
        print(f"  try {result.prometheus_url}/graph?g0.expr=caption_worker_captions_total", file=out)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM takes the same cleanup path as Ctrl-C.
    raise KeyboardInterrupt


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo; return 0 on success, 1 on failure, 2 on invalid settings."""
    configure_logging(getattr(args, "log_level", None) or "WARNING", getattr(args, "log_format", None) or "text")
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if settings.model.resolve() == DEFAULT_MODEL_DIR.resolve():
        print(TINY_MODEL_NOTICE, file=sys.stderr)

    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = run_demo(args, settings)
    except LocalRunError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted; the worker and the stack parts it started are stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    print_summary(result, sys.stdout)
    print(f"worker stopped with exit code {result.worker_exit_code}; stopped stack parts: "
          f"{', '.join(result.stack_stopped) or 'none (the stack was already running)'}")
    if result.worker_exit_code != 0:
        print(f"demo failed: the worker exited with code {result.worker_exit_code} after SIGTERM", file=sys.stderr)
        return 1
    return 0

"""Observability end to end: metrics, health endpoints and logs of a real worker, scraped by a real Prometheus.

One `caption-worker run` subprocess per module handles a known mix of input
messages while the local stack's Prometheus scrapes it every second. The tests
then compare the worker's counters with what was sent, run every dashboard and
alert expression through Prometheus' HTTP API, and read the worker's JSON logs.
Further tests show that /readyz fails until the model is loaded, the warm-up
caption succeeded and the consumer is in its group, and read the logs of a
worker whose broker refuses connections.

Volumes are a handful of images with the tiny model and 4 new tokens. Every wait
is bounded, and a timeout names what was missing.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from http_client import http_get

from worker import __version__
from worker.errors import ErrorCode
from worker.health import HealthServer, HealthState
from worker.localrun import (
    LocalStack,
    OutputReader,
    RunNames,
    create_topics,
    delete_bucket,
    delete_topics,
    free_port,
    make_s3_client,
    s3_event_notification,
    s3_test_event,
    upload_photo,
    worker_environment,
)
from worker.metrics import KAFKA_OUTAGE_ERRORS, Metrics
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "caption-worker.json"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

# Upper bounds of the waits. A healthy run finishes far sooner.
READY_TIMEOUT_SECONDS = 120.0
RESULTS_TIMEOUT_SECONDS = 120.0
# Prometheus scrapes every second, and rate() needs two samples in its window.
PROMETHEUS_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60.0

GOOD_IMAGES = 3
# What the worker must count for the messages that `observed_run` sends.
EXPECTED_FAILURES = {
    "invalid_json": 1,
    "image_not_found": 1,
    "unsupported_scheme": 1,
    "bucket_not_allowed": 1,
}
EXPECTED_SKIPPED = {"test_event": 1, "null_value": 1}
EXPECTED_MESSAGES = {
    "captioned": GOOD_IMAGES,
    "dead_lettered": sum(EXPECTED_FAILURES.values()),
    "skipped": sum(EXPECTED_SKIPPED.values()),
}

# Secrets passed to the worker. Neither may appear in its output.
SASL_PASSWORD = f"sasl-secret-{uuid.uuid4().hex}"
KEY_PASSWORD = f"key-secret-{uuid.uuid4().hex}"

# A comparison with a number at the end of an alert operand, as in `... > 0.05` or `== 0`.
FINAL_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$", re.IGNORECASE)
SET_OPERATOR = re.compile(r"\b(and|or|unless)\b")
METRIC_SELECTOR = re.compile(r"\b(caption_worker_[a-z0-9_]+)\s*(\{)?")


# ---------------------------------------------------------------- HTTP and Prometheus


def prometheus_query(prometheus_url: str, expr: str) -> dict[str, Any]:
    """Run an instant query and return Prometheus' decoded JSON response, also for HTTP 400 and 422."""
    status, body = http_get(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    try:
        return json.loads(body)
    except ValueError:
        return {"status": "error", "error": f"HTTP {status}: {body[:500]}"}


def wait_for_response(
    prometheus_url: str, expr: str, accept: Callable[[dict[str, Any]], bool], description: str,
    timeout: float = PROMETHEUS_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Repeat a query until `accept(response)` holds, or fail with the expression and the last response."""
    deadline = time.monotonic() + timeout
    while True:
        response = prometheus_query(prometheus_url, expr)
        if response.get("status") == "success" and accept(response):
            return response
        if time.monotonic() >= deadline:
            pytest.fail(f"{description}: no matching response within {timeout:.0f} s\nquery: {expr}\nlast response: {response}")
        time.sleep(1.0)


def has_data(response: dict[str, Any]) -> bool:
    return bool(response["data"]["result"])


def vector_by_label(response: dict[str, Any], label: str | None) -> dict[str, float]:
    """Turn an instant vector into {label value: sample value}. With `label` None, the one sample's key is ""."""
    return {
        (entry["metric"].get(label, "") if label else ""): float(entry["value"][1])
        for entry in response["data"]["result"]
    }


def scope_to_job(expr: str, job: str) -> str:
    """Add a `job` matcher to every caption_worker_ selector, so that only this test's worker can match."""

    def add_matcher(match: re.Match[str]) -> str:
        name, brace = match.group(1), match.group(2)
        return f'{name}{{job="{job}",' if brace else f'{name}{{job="{job}"}}'

    return METRIC_SELECTOR.sub(add_matcher, expr)


def split_set_operations(expr: str) -> list[str]:
    """Split an expression at its top-level `and`, `or` and `unless` (outside brackets and strings)."""
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    start = 0
    index = 0
    while index < len(expr):
        char = expr[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            match = SET_OPERATOR.match(expr, index)
            if match and (index == 0 or not (expr[index - 1].isalnum() or expr[index - 1] == "_")):
                parts.append(expr[start:index])
                index = match.end()
                start = index
                continue
        index += 1
    parts.append(expr[start:])
    return [part.strip() for part in parts]


def without_final_comparison(operand: str) -> str:
    return FINAL_COMPARISON.sub("", operand).strip()


# ---------------------------------------------------------------- dashboard and rules


def dashboard_expressions() -> list[str]:
    """Return every `targets[].expr` of the dashboard, through rows and nested panels."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for target in node.get("targets", []) if isinstance(node.get("targets"), list) else []:
                if isinstance(target, dict) and target.get("expr"):
                    found.append(target["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD_FILE.read_text()))
    return found


def alert_rules() -> list[dict[str, Any]]:
    """Return every rule of deploy/prometheus/rules/*.yml."""
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


# ---------------------------------------------------------------- /metrics text


def sample_values(metrics_text: str, name: str, label: str | None = None) -> dict[str, float]:
    """Return {label value: value} of the samples called `name`. With `label` None, the one sample's key is ""."""
    values = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                values[sample.labels.get(label, "") if label else ""] = sample.value
    return values


def nonzero(values: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in values.items() if value}


# ---------------------------------------------------------------- the worker process


@dataclass
class WorkerRun:
    """A worker subprocess with its stderr in a file, and what the test sent to it."""

    process: subprocess.Popen
    metrics_port: int
    stderr_path: Path
    stdout_path: Path
    job: str = ""
    prometheus_url: str = ""
    metrics_text: str = ""
    outputs: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr_path.read_text(errors="replace").splitlines() if line.strip()]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr_lines()[-lines:])

    def wait_for(self, condition: Callable[[], bool], description: str, timeout: float) -> None:
        """Poll `condition` until it holds, or fail when the worker exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode} while waiting for {description}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> int:
        """Send SIGTERM and wait for the ordered shutdown, with SIGKILL after STOP_TIMEOUT_SECONDS."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_worker(environment: dict[str, str], tmp_dir: Path, *args: str) -> WorkerRun:
    """Start `python -m worker run` with JSON logs, the tiny-model limits of these tests and `args`."""
    port = free_port()
    stderr_path = tmp_dir / "worker.stderr"
    stdout_path = tmp_dir / "worker.stdout"
    command = [
        sys.executable, "-m", "worker", "run",
        "--log-format", "json",
        "--max-new-tokens", "4",
        "--cache-size", "1",
        "--metrics-host", "127.0.0.1",
        "--metrics-port", str(port),
        "--commit-interval-seconds", "1",
        "--drain-timeout-seconds", "20",
        *args,
    ]
    with stderr_path.open("wb") as stderr, stdout_path.open("wb") as stdout:
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    return WorkerRun(process, port, stderr_path, stdout_path)


def start_worker_on_broker(local_stack, model_dir: Path, bootstrap: str, name: str, tmp_dir: Path) -> WorkerRun:
    """Start a worker on the local S3 server but on the broker at `bootstrap`, with topics and group named after `name`."""
    environment = worker_environment(local_stack, {"CAPTION_MODEL": str(model_dir),
                                                   "CAPTION_BOOTSTRAP_SERVERS": bootstrap})
    return start_worker(environment, tmp_dir, "--input-topic", f"{name}-images", "--output-topic", f"{name}-captions",
                        "--dlq-topic", f"{name}-dlq", "--group-id", name)


def send_messages(bootstrap: str, topic: str, values: list[bytes | None]) -> None:
    """Produce `values` in order (None as a Kafka null value) and wait until the broker acknowledged each."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[str] = []

    def on_delivery(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    for index, value in enumerate(values):
        producer.produce(topic, key=f"obs-{index}".encode(), value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "the test producer did not deliver every message within 30 s"
    assert not errors, f"the test producer failed: {errors}"


def message_mix(s3: Any, bucket: str, photos: list[Path]) -> list[bytes | None]:
    """Return GOOD_IMAGES S3 event notifications of uploaded photos, then the bad and skipped messages."""
    values: list[bytes | None] = []
    for index in range(GOOD_IMAGES):
        photo = photos[index % len(photos)]
        uploaded = upload_photo(s3, bucket, f"uploads/{index:02d}{photo.suffix}", photo)
        values.append(json.dumps(s3_event_notification(uploaded)).encode())

    # One message per entry of EXPECTED_FAILURES and EXPECTED_SKIPPED. The URIs with
    # another scheme or bucket are rejected before any request, so nothing is contacted.
    values.append(b"{not json")
    values.append(json.dumps({"id": "missing", "image": f"s3://{bucket}/uploads/missing.jpg"}).encode())
    values.append(json.dumps({"id": "ftp", "image": "ftp://127.0.0.1/photo.jpg"}).encode())
    values.append(json.dumps({"id": "other-bucket", "image": f"s3://{bucket}-other/photo.jpg"}).encode())
    values.append(json.dumps(s3_test_event(bucket)).encode())
    values.append(None)
    return values


def read_records(bootstrap: str, topics: list[str], outputs: int, errors: int, run: WorkerRun) -> None:
    """Read the output and dead-letter topics into `run` until `outputs` captions and `errors` error records arrived."""
    reader = OutputReader(bootstrap, topics)

    def complete() -> bool:
        for record in reader.poll(0.5):
            (run.errors if record.is_error else run.outputs).append(record.value)
        return len(run.outputs) >= outputs and len(run.errors) >= errors

    try:
        run.wait_for(complete, f"{outputs} caption records and {errors} error records", RESULTS_TIMEOUT_SECONDS)
    finally:
        reader.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def observed_run(local_stack, tiny_model_dir, sample_photos, tmp_path_factory) -> Iterator[WorkerRun]:
    """A running worker that has handled the message mix, scraped by Prometheus under a job of its own.

    Steps: create topics and a bucket, start the worker, list it as a scrape target,
    wait until /readyz passes and Prometheus has scraped it ready, send the mix, read
    every record back, and wait until /metrics counts every message. The worker keeps
    running until the module's tests are done.
    """
    names = RunNames.unique("obs")
    bootstrap = local_stack.kafka_bootstrap
    topics = [names.input_topic, names.output_topic, names.dlq_topic]
    s3 = make_s3_client(local_stack.s3_endpoint)
    create_topics(bootstrap, dict.fromkeys(topics, 1))
    s3.create_bucket(Bucket=names.bucket)
    # LocalStack keeps the scrape targets that other runs listed in the shared targets file.
    stack = LocalStack()
    stack.start()

    run: WorkerRun | None = None
    try:
        environment = worker_environment(local_stack, {"CAPTION_MODEL": str(tiny_model_dir)})
        run = start_worker(
            environment, tmp_path_factory.mktemp("observed-run"),
            "--input-topic", names.input_topic,
            "--output-topic", names.output_topic,
            "--dlq-topic", names.dlq_topic,
            "--group-id", names.group,
            "--s3-allowed-buckets", names.bucket,
            "--kafka-sasl-password", SASL_PASSWORD,
            "--kafka-option", f"ssl.key.password={KEY_PASSWORD}",
            # Lag comes from librdkafka statistics, and a report every second instead of every 10 s keeps the test short.
            "--kafka-option", "statistics.interval.ms=1000",
        )
        run.job = names.prefix
        run.prometheus_url = local_stack.prometheus_url
        stack.add_scrape_target(f"127.0.0.1:{run.metrics_port}", job=run.job)

        run.wait_for(lambda: http_get(run.url("/readyz"))[0] == 200, "/readyz to pass", READY_TIMEOUT_SECONDS)
        # A scrape of the counters at 0 before any message lets rate() and increase() see every increment.
        wait_for_response(run.prometheus_url, f'caption_worker_ready{{job="{run.job}"}} == 1', has_data,
                          "Prometheus scraping the ready worker")

        send_messages(bootstrap, names.input_topic, message_mix(s3, names.bucket, sample_photos))
        read_records(bootstrap, [names.output_topic, names.dlq_topic], GOOD_IMAGES,
                     sum(EXPECTED_FAILURES.values()), run)
        # Records can arrive before the worker's delivery callbacks have counted them.
        run.wait_for(lambda: _counts_complete(run), "/metrics to count every message", RESULTS_TIMEOUT_SECONDS)
        yield run
    finally:
        if run is not None:
            run.stop()
        stack.remove_scrape_targets()
        delete_topics(bootstrap, topics)
        delete_bucket(s3, names.bucket)


def _counts_complete(run: WorkerRun) -> bool:
    status, text = http_get(run.url("/metrics"))
    if status != 200:
        return False
    run.metrics_text = text
    finished = sum(sample_values(text, "caption_worker_messages_total", "outcome").values())
    return finished >= sum(EXPECTED_MESSAGES.values())


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A loopback TCP listener, as a Kafka broker, that leaves connections in its backlog and never responds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def unreachable_broker() -> Iterator[str]:
    """A loopback port bound by this test and never listened on, so every connection to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{reserved.getsockname()[1]}"


# ---------------------------------------------------------------- records and counters


def test_records_match_message_mix(observed_run):
    codes = sorted(record["error"]["code"] for record in observed_run.errors)

    assert len(observed_run.outputs) == GOOD_IMAGES
    assert codes == sorted(EXPECTED_FAILURES)


def test_metrics_endpoint_counts_messages_sent(observed_run):
    text = observed_run.metrics_text

    assert sample_values(text, "caption_worker_captions_total") == {"": GOOD_IMAGES}
    assert nonzero(sample_values(text, "caption_worker_failures_total", "code")) == EXPECTED_FAILURES
    assert nonzero(sample_values(text, "caption_worker_messages_total", "outcome")) == EXPECTED_MESSAGES
    assert nonzero(sample_values(text, "caption_worker_skipped_total", "reason")) == EXPECTED_SKIPPED


def test_labelled_counters_start_at_zero(observed_run):
    text = observed_run.metrics_text

    assert set(sample_values(text, "caption_worker_failures_total", "code")) == {code.value for code in ErrorCode}
    assert set(sample_values(text, "caption_worker_messages_total", "outcome")) == set(EXPECTED_MESSAGES)
    assert set(sample_values(text, "caption_worker_skipped_total", "reason")) >= set(EXPECTED_SKIPPED)
    assert set(sample_values(text, "caption_worker_commits_total", "result")) == {"ok", "failed"}
    assert set(sample_values(text, "caption_worker_kafka_errors_total", "code")) >= set(KAFKA_OUTAGE_ERRORS)


@pytest.mark.parametrize(
    ("expr", "label", "expected"),
    [
        ("sum(caption_worker_captions_total)", None, {"": GOOD_IMAGES}),
        ("sum by (code) (caption_worker_failures_total) > 0", "code", EXPECTED_FAILURES),
        ("sum by (outcome) (caption_worker_messages_total) > 0", "outcome", EXPECTED_MESSAGES),
        ("sum by (reason) (caption_worker_skipped_total) > 0", "reason", EXPECTED_SKIPPED),
    ],
    ids=["captions", "failures", "messages", "skipped"],
)
def test_prometheus_counts_messages_sent(observed_run, expr, label, expected):
    scoped = scope_to_job(expr, observed_run.job)

    response = wait_for_response(observed_run.prometheus_url, scoped,
                             lambda a: vector_by_label(a, label) == expected, f"counts equal to {expected}")

    assert vector_by_label(response, label) == expected


@pytest.mark.parametrize(
    ("expr", "label", "expected"),
    [
        ("sum by (code) (increase(caption_worker_failures_total[5m])) > 0", "code", set(EXPECTED_FAILURES)),
        ("sum by (outcome) (increase(caption_worker_messages_total[5m])) > 0", "outcome", set(EXPECTED_MESSAGES)),
    ],
    ids=["failures", "messages"],
)
def test_increase_counts_first_increment(observed_run, expr, label, expected):
    # Each failure code occurs once. Its increase is 0 if its series first appears
    # with the value 1, so this fails unless the series are scraped at 0 first.
    scoped = scope_to_job(expr, observed_run.job)

    response = wait_for_response(observed_run.prometheus_url, scoped,
                             lambda a: set(vector_by_label(a, label)) == expected, f"an increase for each of {expected}")

    assert set(vector_by_label(response, label)) == expected


# ---------------------------------------------------------------- dashboard and alert expressions


def test_every_dashboard_expression_returns_data(observed_run):
    expressions = dashboard_expressions()
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_SECONDS

    missing = {}
    for expr in expressions:
        response = _response_without_data(observed_run, expr, deadline)
        if response is not None:
            missing[expr] = response

    assert len(expressions) >= 10, f"expected the dashboard's queries in {DASHBOARD_FILE}, found {expressions}"
    assert not missing, "dashboard expressions without data (expression: last response):\n" + _listing(missing)


def test_every_alert_operand_returns_data(observed_run):
    # An alert's comparison (`> 0`, `== 0`, ...) is false in a healthy run, so each operand
    # of and/or/unless is queried without its final comparison, and must return series.
    # The whole expression must still be valid PromQL, with or without data.
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_SECONDS
    invalid: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    for rule in alert_rules():
        expr = rule["expr"].strip()
        response = prometheus_query(observed_run.prometheus_url, scope_to_job(expr, observed_run.job))
        if response.get("status") != "success":
            invalid[f"{rule['alert']}: {expr}"] = response
        for operand in split_set_operations(expr):
            bare = without_final_comparison(operand)
            response = _response_without_data(observed_run, bare, deadline)
            if response is not None:
                missing[f"{rule['alert']}: {bare}"] = response

    assert not invalid, "alert expressions that Prometheus rejects:\n" + _listing(invalid)
    assert not missing, "alert operands without data (alert: operand: last response):\n" + _listing(missing)


def test_prometheus_loads_every_alert_rule(observed_run):
    names = {rule["alert"] for rule in alert_rules()}

    status, body = http_get(f"{observed_run.prometheus_url}/api/v1/rules?type=alert")
    groups = json.loads(body)["data"]["groups"] if status == 200 else []
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    unhealthy = {
        name: loaded[name].get("lastError") for name in names & set(loaded) if loaded[name]["health"] != "ok"
    }

    assert status == 200, body
    assert names <= set(loaded), f"rules missing in Prometheus: {names - set(loaded)}"
    assert not unhealthy, f"rules that Prometheus fails to evaluate: {unhealthy}"


def _response_without_data(run: WorkerRun, expr: str, deadline: float) -> dict[str, Any] | None:
    """Return None once a job-scoped query returns data, or its last response when `deadline` passes first."""
    scoped = scope_to_job(expr, run.job)
    while True:
        response = prometheus_query(run.prometheus_url, scoped)
        if response.get("status") == "success" and has_data(response):
            return None
        if time.monotonic() >= deadline:
            return response
        time.sleep(1.0)


def _listing(problems: dict[str, dict]) -> str:
    return "\n".join(f"- {key}\n  {json.dumps(response)[:400]}" for key, response in problems.items())


# ---------------------------------------------------------------- health endpoints


def test_health_endpoints_pass_while_running(observed_run):
    healthz = http_get(observed_run.url("/healthz"))
    readyz = http_get(observed_run.url("/readyz"))
    text = observed_run.metrics_text

    assert healthz == (200, "ok\n")
    assert readyz == (200, "ok\n")
    assert sample_values(text, "caption_worker_ready") == {"": 1.0}
    assert sample_values(text, "caption_worker_last_poll_timestamp_seconds")[""] > 0


def test_build_info_labels(observed_run, tiny_model_dir):
    samples = [
        sample
        for family in text_string_to_metric_families(observed_run.metrics_text)
        for sample in family.samples
        if sample.name == "caption_worker_build_info"
    ]

    assert len(samples) == 1
    assert samples[0].labels == {"model": tiny_model_dir.name, "device": "CPU", "version": __version__}
    assert samples[0].value == 1.0


def test_readyz_follows_startup_steps(tiny_model_dir):
    from worker.engine import CaptionEngine

    settings = load_settings(None, model=tiny_model_dir, max_new_tokens=4, cache_size=1)
    metrics = Metrics()
    health = HealthState(metrics, settings.max_poll_gap_seconds)
    server = HealthServer("127.0.0.1", 0, metrics, health)
    server.start()
    engine = CaptionEngine.from_settings(settings, metrics)
    readyz = f"http://127.0.0.1:{server.port}/readyz"
    steps: list[tuple[str, tuple[int, str], float]] = []

    def record(step: str) -> None:
        steps.append((step, http_get(readyz), metrics.registry.get_sample_value("caption_worker_ready")))

    try:
        record("before start")
        engine.start()
        health.set_model_loaded()
        record("model loaded")
        engine.warm_up()
        health.set_warmed_up()
        record("warmed up")
        health.set_in_group(True)
        record("in group")
        health.set_outage("s3", True)
        record("S3 outage")
    finally:
        engine.close(10.0)
        server.close()

    assert steps == [
        ("before start", (503, "model not loaded\n"), 0.0),
        ("model loaded", (503, "warm-up caption not done\n"), 0.0),
        ("warmed up", (503, "consumer not in its group\n"), 0.0),
        ("in group", (200, "ok\n"), 1.0),
        ("S3 outage", (503, "outage of s3\n"), 0.0),
    ]


def test_readyz_fails_outside_consumer_group(local_stack, tiny_model_dir, silent_broker, unique_name, tmp_path):
    # The broker never responds, so the consumer cannot join its group. After the
    # model is loaded and warmed up, /readyz must still fail, while /healthz passes.
    run = start_worker_on_broker(local_stack, tiny_model_dir, silent_broker, unique_name("silent"), tmp_path)
    try:
        run.wait_for(lambda: any(entry.get("message") == "worker started" for entry in _json_lines(run)),
                     "the log line `worker started`", READY_TIMEOUT_SECONDS)
        readyz = http_get(run.url("/readyz"))
        healthz = http_get(run.url("/healthz"))
        metrics_text = http_get(run.url("/metrics"))[1]
    finally:
        run.stop()

    assert readyz == (503, "consumer not in its group\n")
    assert healthz == (200, "ok\n")
    assert sample_values(metrics_text, "caption_worker_ready") == {"": 0.0}


def _json_lines(run: WorkerRun) -> list[dict[str, Any]]:
    """Return the stderr lines that are JSON objects, parsed, and skip any other line."""
    entries = []
    for line in run.stderr_lines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


# ---------------------------------------------------------------- logs


def test_log_lines_are_json_objects(observed_run):
    lines = observed_run.stderr_lines()
    not_json = [line for line in lines if not _is_json_object(line)]
    entries = _json_lines(observed_run)
    incomplete = [entry for entry in entries if not {"level", "logger", "message"} <= set(entry)]

    assert lines, "the worker wrote no log lines"
    assert not not_json, "stderr lines that are not JSON objects:\n" + "\n".join(not_json[:10])
    assert not incomplete, f"log entries without level, logger or message: {incomplete[:5]}"
    assert observed_run.stdout_path.read_text() == ""


def test_settings_summary_masks_secrets(observed_run):
    summaries = [entry for entry in _json_lines(observed_run) if entry.get("message") == "settings"]
    everything = observed_run.stderr_path.read_text() + observed_run.stdout_path.read_text()

    assert len(summaries) == 1
    assert summaries[0]["level"] == "INFO"
    assert "kafka_sasl_password=***" in summaries[0]["summary"]
    assert "'ssl.key.password': '***'" in summaries[0]["summary"]
    assert SASL_PASSWORD not in everything
    assert KEY_PASSWORD not in everything


def test_failed_messages_are_logged_with_code(observed_run):
    failed = [entry for entry in _json_lines(observed_run) if entry.get("message") == "message failed"]
    codes = sorted(entry.get("code") for entry in failed)

    assert codes == sorted(EXPECTED_FAILURES)
    assert all(entry["level"] == "WARNING" for entry in failed)
    assert all({"topic", "partition", "offset"} <= set(entry) for entry in failed)


def _refused_connections(run: WorkerRun) -> float:
    status, text = http_get(run.url("/metrics"))
    if status != 200:
        return 0.0
    return sample_values(text, "caption_worker_kafka_errors_total", "code").get("_TRANSPORT", 0.0)


# Refused connections that the refused-broker test waits for: librdkafka retries about every 50 ms.
REFUSED_CONNECTIONS = 20


def test_kafka_client_logs_are_json(
    local_stack, tiny_model_dir, unreachable_broker, unique_name, tmp_path
):
    run = start_worker_on_broker(local_stack, tiny_model_dir, unreachable_broker, unique_name("refused"), tmp_path)
    try:
        run.wait_for(lambda: any(entry.get("message") == "all brokers down" for entry in _json_lines(run)),
                     "the log line `all brokers down`", READY_TIMEOUT_SECONDS)
        run.wait_for(lambda: _refused_connections(run) >= REFUSED_CONNECTIONS,
                     f"{REFUSED_CONNECTIONS} refused connections in caption_worker_kafka_errors_total",
                     READY_TIMEOUT_SECONDS)
        counted = _refused_connections(run)
    finally:
        run.stop()
    not_json = [line for line in run.stderr_lines() if not _is_json_object(line)]
    entries = _json_lines(run)
    client_lines = [entry for entry in entries if entry.get("logger") == "librdkafka"]
    logged_errors = [entry for entry in entries
                     if entry.get("message") == "Kafka client error" and entry.get("code") == "_TRANSPORT"]

    assert not not_json, "stderr lines that are not JSON objects:\n" + "\n".join(not_json[:5])
    assert client_lines, "no librdkafka line was logged through the worker's format"
    assert all({"facility", "client"} <= set(entry) for entry in client_lines)
    assert len(logged_errors) < counted, "every repeated client error was logged; repeats must be rate-limited"


def test_lifecycle_is_logged_at_info(observed_run):
    info = {entry["message"] for entry in _json_lines(observed_run) if entry.get("level") == "INFO"}

    assert {"settings", "health server started", "model ready", "worker started", "partitions assigned"} <= info


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False

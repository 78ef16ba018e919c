"""Checks that the local stack runs real services: Kafka with transactions, S3 over HTTP, Prometheus."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
import urllib.request

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

# Bound of each wait on a service, so a broken stack fails the test instead of hanging it.
WAIT_SECONDS = 60.0


def _consume_until_end(bootstrap: str, topic: str, group: str, isolation_level: str) -> list[bytes]:
    """Read a one-partition topic from the start until the end of the partition, and return the values."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "isolation.level": isolation_level,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + WAIT_SECONDS
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    return values
                raise AssertionError(f"consumer error: {message.error()}")
            values.append(message.value())
    finally:
        consumer.close()
    raise AssertionError(f"no end of partition on {topic} within {WAIT_SECONDS:.0f} s; read so far: {values}")


def test_kafka_message_round_trip(kafka_bootstrap, make_topic, group_id):
    topic = make_topic()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"key-1", value=b'{"image": "s3://bucket/a.jpg"}')
    assert producer.flush(WAIT_SECONDS) == 0

    values = _consume_until_end(kafka_bootstrap, topic, group_id, "read_committed")

    assert values == [b'{"image": "s3://bucket/a.jpg"}']


def test_kafka_aborted_transaction_is_hidden(kafka_bootstrap, make_topic, group_id, unique_name):
    topic = make_topic()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_name("test-tx")})
    producer.init_transactions(WAIT_SECONDS)

    producer.begin_transaction()
    producer.produce(topic, value=b"committed")
    producer.commit_transaction(WAIT_SECONDS)

    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    # Without the flush, abort_transaction drops the unsent record before it reaches the broker.
    assert producer.flush(WAIT_SECONDS) == 0
    producer.abort_transaction(WAIT_SECONDS)

    committed_view = _consume_until_end(kafka_bootstrap, topic, group_id, "read_committed")
    uncommitted_view = _consume_until_end(kafka_bootstrap, topic, group_id + "-raw", "read_uncommitted")

    assert committed_view == [b"committed"]
    # The aborted record did reach the log, so read_committed really filtered it out.
    assert uncommitted_view == [b"committed", b"aborted"]


def test_s3_object_round_trip(s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="photos/cat 1.jpg", Body=b"\xff\xd8\xff\xe0 not a real jpeg")

    response = s3_client.get_object(Bucket=bucket, Key="photos/cat 1.jpg")

    assert response["Body"].read() == b"\xff\xd8\xff\xe0 not a real jpeg"
    assert response["ContentLength"] == 20


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    body = b"# TYPE stack_test_up gauge\nstack_test_up 1\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def metrics_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _active_targets(prometheus_url: str) -> list[dict]:
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/targets?state=active", timeout=5) as response:
        return json.load(response)["data"]["activeTargets"]


def _query(prometheus_url: str, expression: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{query}", timeout=5) as response:
        return json.load(response)["data"]["result"]


def test_prometheus_scrapes_added_target(prometheus_url, add_scrape_target, metrics_server, unique_name):
    job = unique_name("stack-test")
    add_scrape_target(metrics_server, job=job)

    health = None
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and health != "up":
        targets = [target for target in _active_targets(prometheus_url) if target["labels"]["job"] == job]
        health = targets[0]["health"] if targets else None
        time.sleep(0.5)
    assert health == "up"

    samples = _query(prometheus_url, f'stack_test_up{{job="{job}"}}')
    assert [sample["value"][1] for sample in samples] == ["1"]


def test_prometheus_scrapes_itself(prometheus_url):
    samples: list[dict] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and not samples:
        samples = _query(prometheus_url, 'up{job="prometheus"} == 1')
        time.sleep(0.5)

    assert len(samples) == 1


def test_prometheus_loads_alert_rules(prometheus_url, stack_script):
    rule_files = sorted(stack_script.RULES_DIR.glob("*.yml"))
    if not rule_files:
        pytest.skip(f"no alert rules in {stack_script.RULES_DIR}: add *.yml rule files there to test their loading")

    with urllib.request.urlopen(f"{prometheus_url}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]

    assert {group["file"] for group in groups} == {str(path) for path in rule_files}


def test_stack_start_reuses_running_parts(local_stack, stack_script):
    again = stack_script.ensure_running()

    assert again == local_stack

"""Tests of worker.fetching against the local S3 server and a misbehaving one on 127.0.0.1.

Every boto3 client here gets an explicit loopback endpoint; conftest.py sets dummy
credentials and AWS_EC2_METADATA_DISABLED, so nothing can reach AWS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from flaky_s3 import FlakyS3
from worker.errors import CaptionError, ErrorCode, TransientError
from worker.events import ImageRef, parse_message
from worker.fetching import Fetcher
from worker.metrics import Metrics
from worker.settings import load_settings

FLAKY_BUCKET = "flaky"
TRICKY_KEYS = [
    "my photo (1).jpg",
    "a+b=c&d.png",
    "café/猫 2024.jpg",
    "deep/nested/folders/x.webp",
    "100% sure?.gif",
]


def make_settings(endpoint: str, **overrides):
    values = {
        "s3_endpoint_url": endpoint,
        "s3_region": "us-east-1",
        "s3_addressing_style": "path",
        "s3_allowed_buckets": ["*"],
        "s3_max_attempts": 3,
        "s3_connect_timeout_seconds": 2.0,
        "s3_read_timeout_seconds": 5.0,
        **overrides,
    }
    return load_settings(**values)


def sample_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_metadata_service_is_disabled():
    # Guards every test below: boto3 must never look for instance credentials.
    assert os.environ.get("AWS_EC2_METADATA_DISABLED") == "true"
    assert os.environ.get("AWS_ACCESS_KEY_ID")


# Against the local S3 server


@pytest.fixture
def fetcher_for(s3_endpoint):
    created: list[Fetcher] = []

    def make(metrics: Metrics | None = None, **overrides) -> Fetcher:
        fetcher = Fetcher(make_settings(s3_endpoint, **overrides), metrics or Metrics(), backoff_seconds=0.01)
        created.append(fetcher)
        return fetcher

    yield make

    for fetcher in created:
        fetcher.close()


def amazon_notification(bucket: str, key: str) -> bytes:
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": urllib.parse.quote_plus(key, safe="/")}},
    }
    return json.dumps({"Records": [record]}).encode()


def minio_notification(bucket: str, key: str) -> bytes:
    encoded = urllib.parse.quote_plus(key, safe="")
    record = {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": encoded}}}
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{encoded}", "Records": [record]}).encode()


def own_event(bucket: str, key: str) -> bytes:
    return json.dumps({"image": f"s3://{bucket}/{key}"}).encode()


@pytest.mark.parametrize("make_event", [amazon_notification, minio_notification, own_event])
def test_tricky_keys_fetch_end_to_end(make_event, s3_client, bucket, fetcher_for):
    fetcher = fetcher_for()
    settings = make_settings("http://127.0.0.1:1")
    for index, key in enumerate(TRICKY_KEYS):
        s3_client.put_object(Bucket=bucket, Key=key, Body=f"object {index}".encode())

    for index, key in enumerate(TRICKY_KEYS):
        parsed = parse_message(make_event(bucket, key), default_id=f"t-{index}", settings=settings)
        assert len(parsed.images) == 1, parsed

        fetched = fetcher.fetch(parsed.images[0].image)

        assert fetched.data == f"object {index}".encode()
        assert fetched.attempts == 1


def test_version_id_selects_the_version(s3_client, bucket, fetcher_for):
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = s3_client.put_object(Bucket=bucket, Key="v.png", Body=b"first")["VersionId"]
    s3_client.put_object(Bucket=bucket, Key="v.png", Body=b"second")
    fetcher = fetcher_for()

    assert fetcher.fetch(ImageRef("s3", bucket, "v.png", first)).data == b"first"
    assert fetcher.fetch(ImageRef("s3", bucket, "v.png")).data == b"second"


def test_missing_version_is_image_not_found(s3_client, bucket, fetcher_for):
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=bucket, Key="v.png", Body=b"data")
    fetcher = fetcher_for()

    with pytest.raises(CaptionError) as caught:
        fetcher.fetch(ImageRef("s3", bucket, "v.png", "3sL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"))

    assert caught.value.code == ErrorCode.IMAGE_NOT_FOUND


@pytest.mark.parametrize("missing", ["key", "bucket"])
def test_missing_object_is_image_not_found(missing, bucket, fetcher_for, unique_name):
    metrics = Metrics()
    fetcher = fetcher_for(metrics)
    ref = ImageRef("s3", bucket, "nothing-here.jpg") if missing == "key" else ImageRef("s3", unique_name("gone"), "a.jpg")

    with pytest.raises(CaptionError) as caught:
        fetcher.fetch(ref)

    assert caught.value.code == ErrorCode.IMAGE_NOT_FOUND
    assert caught.value.retryable is False
    expected_label = "NoSuchKey" if missing == "key" else "NoSuchBucket"
    assert sample_value(metrics, "caption_worker_s3_errors_total", {"code": expected_label}) == 1


def test_empty_object_is_empty_object(s3_client, bucket, fetcher_for):
    s3_client.put_object(Bucket=bucket, Key="empty.jpg", Body=b"")

    with pytest.raises(CaptionError) as caught:
        fetcher_for().fetch(ImageRef("s3", bucket, "empty.jpg"))

    assert caught.value.code == ErrorCode.EMPTY_OBJECT


def test_large_object_is_object_too_large(s3_client, bucket, fetcher_for):
    s3_client.put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 2048)

    with pytest.raises(CaptionError) as caught:
        fetcher_for(max_image_bytes=1024).fetch(ImageRef("s3", bucket, "big.jpg"))

    assert caught.value.code == ErrorCode.OBJECT_TOO_LARGE
    assert "2048" in caught.value.message


def test_object_at_the_size_limit_is_fetched(s3_client, bucket, fetcher_for):
    s3_client.put_object(Bucket=bucket, Key="edge.jpg", Body=b"x" * 1024)

    assert len(fetcher_for(max_image_bytes=1024).fetch(ImageRef("s3", bucket, "edge.jpg")).data) == 1024


def test_bucket_outside_allow_list_is_rejected(s3_client, bucket, fetcher_for):
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"data")
    fetcher = fetcher_for(s3_allowed_buckets=["someone-else"])

    with pytest.raises(CaptionError) as caught:
        fetcher.fetch(ImageRef("s3", bucket, "a.jpg"))

    assert caught.value.code == ErrorCode.BUCKET_NOT_ALLOWED
    assert bucket in caught.value.message


def test_named_bucket_is_allowed(s3_client, bucket, fetcher_for):
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=b"data")

    assert fetcher_for(s3_allowed_buckets=["other", bucket]).fetch(ImageRef("s3", bucket, "a.jpg")).data == b"data"


def test_empty_allow_list_allows_none_and_warns(bucket, fetcher_for, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.fetching"):
        fetcher = fetcher_for(s3_allowed_buckets=[])

    assert "--s3-allowed-buckets" in caplog.text
    with pytest.raises(CaptionError) as caught:
        fetcher.fetch(ImageRef("s3", bucket, "a.jpg"))
    assert caught.value.code == ErrorCode.BUCKET_NOT_ALLOWED


def test_other_scheme_is_never_fetched(fetcher_for):
    with pytest.raises(CaptionError) as caught:
        fetcher_for().fetch(ImageRef("https", "example.com", "a.jpg"))

    assert caught.value.code == ErrorCode.UNSUPPORTED_SCHEME


def test_threads_share_one_fetcher(s3_client, bucket, fetcher_for):
    metrics = Metrics()
    fetcher = fetcher_for(metrics, fetch_threads=8)
    for index in range(32):
        s3_client.put_object(Bucket=bucket, Key=f"img-{index}.png", Body=f"payload {index}".encode() * 100)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: fetcher.fetch(ImageRef("s3", bucket, f"img-{i}.png")), range(32)))

    assert [result.data for result in results] == [f"payload {i}".encode() * 100 for i in range(32)]
    assert sample_value(metrics, "caption_worker_fetch_seconds_count") == 32
    assert sample_value(metrics, "caption_worker_image_bytes_count") == 32
    assert fetcher.store_healthy()


# Against the misbehaving server


@pytest.fixture
def flaky():
    server = FlakyS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def flaky_fetcher(flaky):
    created: list[Fetcher] = []

    def make(metrics: Metrics | None = None, **overrides) -> Fetcher:
        fetcher = Fetcher(
            make_settings(flaky.endpoint, **overrides),
            metrics or Metrics(),
            backoff_seconds=0.01,
            probe_interval_seconds=0.0,
        )
        created.append(fetcher)
        return fetcher

    yield make

    for fetcher in created:
        fetcher.close()


def fetch_error(fetcher: Fetcher, key: str, bucket: str = FLAKY_BUCKET) -> CaptionError:
    with pytest.raises(CaptionError) as caught:
        fetcher.fetch(ImageRef("s3", bucket, key))
    return caught.value


@pytest.mark.parametrize("plan", [["slowdown"], ["too_many"], ["internal", "internal"]])
def test_throttling_and_5xx_are_retried(plan, flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "a.jpg", b"image bytes", plan=plan)
    metrics = Metrics()

    fetched = flaky_fetcher(metrics).fetch(ImageRef("s3", FLAKY_BUCKET, "a.jpg"))

    assert fetched.data == b"image bytes"
    assert fetched.attempts == len(plan) + 1
    assert flaky.get_requests[(FLAKY_BUCKET, "a.jpg")] == len(plan) + 1
    assert sample_value(metrics, "caption_worker_fetch_retries_total") == len(plan)


def test_short_body_is_retried_not_corrupt(flaky, flaky_fetcher):
    data = bytes(range(256)) * 400
    flaky.put(FLAKY_BUCKET, "short.jpg", data, plan=["short"])
    metrics = Metrics()

    fetched = flaky_fetcher(metrics).fetch(ImageRef("s3", FLAKY_BUCKET, "short.jpg"))

    assert fetched.data == data
    assert fetched.attempts == 2
    assert sample_value(metrics, "caption_worker_s3_errors_total", {"code": "IncompleteBody"}) == 1
    assert sample_value(metrics, "caption_worker_fetch_retries_total") == 1


def test_one_failing_key_is_fetch_failed(flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "good.jpg", b"good")
    flaky.put(FLAKY_BUCKET, "bad.jpg", b"bad")
    flaky.fail_always(FLAKY_BUCKET, "bad.jpg", "internal")
    fetcher = flaky_fetcher(s3_max_attempts=2)

    assert fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, "good.jpg")).data == b"good"
    error = fetch_error(fetcher, "bad.jpg")

    assert error.code == ErrorCode.FETCH_FAILED
    assert error.retryable is True
    assert flaky.get_requests[(FLAKY_BUCKET, "bad.jpg")] == 2
    assert fetcher.store_healthy()


def test_body_that_always_breaks_is_fetch_failed(flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "broken.jpg", b"z" * 10_000)
    flaky.fail_always(FLAKY_BUCKET, "broken.jpg", "short")

    error = fetch_error(flaky_fetcher(s3_max_attempts=2), "broken.jpg")

    assert error.code == ErrorCode.FETCH_FAILED
    assert error.retryable is True


def test_failing_store_raises_transient_error(flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "a.jpg", b"data")
    flaky.set_bucket_down(FLAKY_BUCKET, "internal")
    fetcher = flaky_fetcher(s3_max_attempts=2)

    with pytest.raises(TransientError):
        fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, "a.jpg"))

    assert fetcher.store_healthy() is False
    flaky.set_bucket_down(FLAKY_BUCKET, None)
    assert fetcher.store_healthy() is True
    assert fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, "a.jpg")).data == b"data"


def test_persistent_throttling_raises_transient_error(flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "a.jpg", b"data")
    flaky.fail_always(FLAKY_BUCKET, "a.jpg", "slowdown")
    fetcher = flaky_fetcher(s3_max_attempts=2)

    with pytest.raises(TransientError):
        fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, "a.jpg"))


def test_unreachable_store_raises_transient_error():
    # A port that was just free on loopback: connections to it are refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = Metrics()
    fetcher = Fetcher(make_settings(f"http://127.0.0.1:{port}", s3_max_attempts=2), metrics, backoff_seconds=0.01)

    with pytest.raises(TransientError):
        fetcher.fetch(ImageRef("s3", "any", "a.jpg"))

    assert sample_value(metrics, "caption_worker_s3_errors_total", {"code": "ConnectionError"}) == 1
    fetcher.close()


def test_forbidden_is_access_denied_and_logged(flaky, flaky_fetcher, caplog):
    flaky.put(FLAKY_BUCKET, "secret.jpg", b"data")
    flaky.fail_always(FLAKY_BUCKET, "secret.jpg", "forbidden")
    metrics = Metrics()
    fetcher = flaky_fetcher(metrics)

    with caplog.at_level(logging.ERROR, logger="worker.fetching"):
        error = fetch_error(fetcher, "secret.jpg")
        fetch_error(fetcher, "secret.jpg")

    assert error.code == ErrorCode.ACCESS_DENIED
    assert error.retryable is False
    assert flaky.get_requests[(FLAKY_BUCKET, "secret.jpg")] == 2
    assert sample_value(metrics, "caption_worker_s3_errors_total", {"code": "AccessDenied"}) == 2
    denied_logs = [record for record in caplog.records if "denied" in record.getMessage()]
    assert len(denied_logs) == 1
    assert denied_logs[0].levelno == logging.ERROR


def test_declared_size_rejected_before_body(flaky, flaky_fetcher):
    flaky.put(FLAKY_BUCKET, "huge.jpg", b"", plan=["held"])

    error = fetch_error(flaky_fetcher(max_image_bytes=1024 * 1024), "huge.jpg")
    sent_before_release = flaky.body_bytes_sent[(FLAKY_BUCKET, "huge.jpg")]
    flaky.release_held()

    assert error.code == ErrorCode.OBJECT_TOO_LARGE
    # The server sends no body byte until released, so a client that read the body
    # would have waited for its read timeout and failed otherwise.
    assert sent_before_release == 0
    assert flaky.get_requests[(FLAKY_BUCKET, "huge.jpg")] == 1


def test_body_without_length_is_capped(flaky, flaky_fetcher):
    data = b"y" * (8 * 1024 * 1024)
    flaky.put(FLAKY_BUCKET, "stream.jpg", data, plan=["chunked"])

    error = fetch_error(flaky_fetcher(max_image_bytes=256 * 1024), "stream.jpg")

    assert error.code == ErrorCode.OBJECT_TOO_LARGE
    assert "262144" in error.message


def test_chunked_body_within_limit_is_fetched(flaky, flaky_fetcher):
    data = b"w" * 300_000
    flaky.put(FLAKY_BUCKET, "stream.jpg", data, plan=["chunked"])

    assert flaky_fetcher().fetch(ImageRef("s3", FLAKY_BUCKET, "stream.jpg")).data == data


def test_concurrent_success_makes_failure_final(flaky, flaky_fetcher):
    # While one thread fails on a key, other threads succeed: the key fails alone.
    flaky.put(FLAKY_BUCKET, "bad.jpg", b"bad")
    flaky.fail_always(FLAKY_BUCKET, "bad.jpg", "internal")
    for index in range(20):
        flaky.put(FLAKY_BUCKET, f"good-{index}.jpg", b"good")
    fetcher = flaky_fetcher(s3_max_attempts=3)
    outcomes: list[object] = []

    def fetch_bad() -> None:
        try:
            fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, "bad.jpg"))
        except (CaptionError, TransientError) as exc:
            outcomes.append(exc)

    thread = threading.Thread(target=fetch_bad)
    thread.start()
    for index in range(20):
        fetcher.fetch(ImageRef("s3", FLAKY_BUCKET, f"good-{index}.jpg"))
    thread.join(timeout=60)

    assert len(outcomes) == 1
    assert isinstance(outcomes[0], CaptionError)
    assert outcomes[0].code == ErrorCode.FETCH_FAILED

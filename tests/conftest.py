"""Shared fixtures: the local stack (Kafka, S3 server, Prometheus), unique names, the tiny model.

The stack is started once per session through deploy/local/stack.py, or reused when it
already runs. A session that starts it leaves it running for the next one, and
`python deploy/local/stack.py stop` (or `make stack-stop`) stops it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import boto3
import pytest
from botocore.config import Config
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = ROOT / "worker" / "models" / "tiny-gemma3"
SAMPLES_DIR = ROOT / "worker" / "samples"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# Seconds that a fixture waits for the broker to create or list a topic.
KAFKA_ADMIN_TIMEOUT_SECONDS = 30.0


def _load_stack_module() -> ModuleType:
    """Import deploy/local/stack.py by path, because deploy/ is not a package."""
    name = "caption_worker_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class body runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_configure(config: pytest.Config) -> None:
    # Dummy credentials and no instance metadata, so boto3 in any test can reach
    # neither a real AWS account nor 169.254.169.254. HF_HUB_OFFLINE keeps libraries off model hubs.
    os.environ.update(_load_stack_module().AWS_DUMMY_ENV)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    os.environ["HF_HUB_OFFLINE"] = "1"


# ---------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def stack_script() -> ModuleType:
    """The deploy/local/stack.py module."""
    return _load_stack_module()


@pytest.fixture(scope="session")
def local_stack(stack_script):
    """Endpoints of the running local stack (`kafka_bootstrap`, `s3_endpoint`, `prometheus_url`, `targets_file`)."""
    return stack_script.ensure_running()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_stack) -> str:
    return local_stack.kafka_bootstrap


@pytest.fixture(scope="session")
def s3_endpoint(local_stack) -> str:
    return local_stack.s3_endpoint


@pytest.fixture(scope="session")
def prometheus_url(local_stack) -> str:
    return local_stack.prometheus_url


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY_MODEL_DIR / "openvino_language_model.xml").exists():
        pytest.skip(
            f"tiny test model not found in {TINY_MODEL_DIR}: build it with "
            "`.venv-model/bin/python scripts/build_tiny_model.py` (needs the `model` extra)"
        )
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def sample_photos() -> list[Path]:
    photos = sorted(path for path in SAMPLES_DIR.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    assert photos, f"no sample photographs in {SAMPLES_DIR}"
    return photos


# ---------------------------------------------------------------- function fixtures


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Return a function that appends a random suffix to a prefix.

    The result is lowercase letters, digits and hyphens when the prefix is, so it is
    valid as a Kafka topic, a consumer group and an S3 bucket name.
    """

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def make_topic(kafka_bootstrap, unique_name) -> Iterator[Callable[..., str]]:
    """Return a function `(partitions=1) -> name` that creates a unique topic and waits for its leaders.

    The topics are deleted after the test.
    """
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def make(partitions: int = 1) -> str:
        name = unique_name("test-topic")
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            request_timeout=KAFKA_ADMIN_TIMEOUT_SECONDS,
        )
        futures[name].result(timeout=KAFKA_ADMIN_TIMEOUT_SECONDS)
        created.append(name)
        _wait_for_topic_leaders(admin, name, partitions)
        return name

    yield make

    if created:
        for future in admin.delete_topics(created, request_timeout=KAFKA_ADMIN_TIMEOUT_SECONDS).values():
            future.result(timeout=KAFKA_ADMIN_TIMEOUT_SECONDS)


def _wait_for_topic_leaders(admin: AdminClient, name: str, partitions: int) -> None:
    """Poll the metadata until every partition of the topic has a leader."""
    deadline = time.monotonic() + KAFKA_ADMIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (
            topic is not None
            and topic.error is None
            and len(topic.partitions) == partitions
            and all(partition.leader >= 0 for partition in topic.partitions.values())
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for a leader on each of the {partitions} partitions of topic {name}")


@pytest.fixture
def group_id(unique_name) -> str:
    return unique_name("test-group")


@pytest.fixture
def s3_client(s3_endpoint):
    """A boto3 S3 client for the local S3 server, with dummy credentials and path-style addressing."""
    stack = _load_stack_module()
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=stack.AWS_DUMMY_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=stack.AWS_DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.AWS_DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
    )
    yield client
    client.close()


@pytest.fixture
def bucket(s3_client, unique_name) -> Iterator[str]:
    """A new empty bucket, deleted with its objects after the test."""
    name = unique_name("test-bucket")
    s3_client.create_bucket(Bucket=name)
    yield name

    # list_object_versions also lists plain objects, and covers tests that enable versioning.
    pages = s3_client.get_paginator("list_object_versions").paginate(Bucket=name)
    for page in pages:
        for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3_client.delete_object(Bucket=name, Key=entry["Key"], VersionId=entry["VersionId"])
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def worker_env(local_stack) -> dict[str, str]:
    """Environment for a worker subprocess: this process's environment pointed at the local stack."""
    stack = _load_stack_module()
    return {
        **os.environ,
        **stack.AWS_DUMMY_ENV,
        "CAPTION_BOOTSTRAP_SERVERS": local_stack.kafka_bootstrap,
        "CAPTION_S3_ENDPOINT_URL": local_stack.s3_endpoint,
        "CAPTION_S3_ADDRESSING_STYLE": "path",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def add_scrape_target(local_stack) -> Iterator[Callable[..., None]]:
    """Return a function `(host_port, job="caption-worker")` that makes Prometheus scrape a target.

    It rewrites the stack's file_sd file, which Prometheus reads every second.
    The file is emptied after the test.
    """
    targets_file: Path = local_stack.targets_file
    added: list[tuple[str, str]] = []

    def add(host_port: str, job: str = "caption-worker") -> None:
        added.append((host_port, job))
        _write_targets(targets_file, added)

    yield add

    _write_targets(targets_file, [])


def _write_targets(targets_file: Path, targets: list[tuple[str, str]]) -> None:
    groups = [{"targets": [host_port], "labels": {"job": job}} for host_port, job in targets]
    # Rename over the old file, so Prometheus never reads a half-written one.
    partial = targets_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(groups, indent=2) + "\n")
    partial.replace(targets_file)

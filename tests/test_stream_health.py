import time

import pytest

from http_client import http_get
from worker.health import HealthServer, HealthState
from worker.metrics import Metrics


def get(port: int, path: str) -> tuple[int, str]:
    return http_get(f"http://127.0.0.1:{port}{path}")


def ready_state(metrics: Metrics) -> HealthState:
    state = HealthState(metrics, max_poll_gap_seconds=60)
    state.set_model_loaded()
    state.set_warmed_up()
    state.set_in_group(True)
    return state


@pytest.fixture
def server():
    metrics = Metrics()
    state = HealthState(metrics, max_poll_gap_seconds=60)
    health_server = HealthServer("127.0.0.1", 0, metrics, state)
    health_server.start()
    yield health_server, state, metrics
    health_server.close()


def test_readiness_needs_model_warm_up_and_group():
    metrics = Metrics()
    state = HealthState(metrics, max_poll_gap_seconds=60)
    assert state.readiness_problem() == "model not loaded"
    state.set_model_loaded()
    assert state.readiness_problem() == "warm-up caption not done"
    state.set_warmed_up()
    assert state.readiness_problem() == "consumer not in its group"
    assert metrics.registry.get_sample_value("caption_worker_ready") == 0
    state.set_in_group(True)
    assert state.readiness_problem() is None
    assert metrics.registry.get_sample_value("caption_worker_ready") == 1


def test_outage_makes_unready_until_over():
    metrics = Metrics()
    state = ready_state(metrics)
    state.set_outage("s3", True)
    assert state.readiness_problem() == "outage of s3"
    assert metrics.registry.get_sample_value("caption_worker_ready") == 0
    assert state.liveness_problem() is None
    state.set_outage("s3", False)
    assert state.readiness_problem() is None
    assert metrics.registry.get_sample_value("caption_worker_ready") == 1


def test_fatal_error_fails_both_probes():
    state = ready_state(Metrics())
    state.set_fatal("producer fenced")
    assert "producer fenced" in state.liveness_problem()
    assert "producer fenced" in state.readiness_problem()


def test_poll_gap_fails_liveness(monkeypatch):
    state = HealthState(Metrics(), max_poll_gap_seconds=5)
    state.record_poll()
    now = time.monotonic()
    monkeypatch.setattr("worker.health.time.monotonic", lambda: now + 6)
    assert "no poll" in state.liveness_problem()


def test_poll_gap_fails_readiness(monkeypatch):
    state = ready_state(Metrics())
    assert state.readiness_problem() is None
    now = time.monotonic()
    monkeypatch.setattr("worker.health.time.monotonic", lambda: now + 61)

    assert state.readiness_problem() == "no poll for 61 s (limit 60 s)"


def test_server_probes_and_metrics(server):
    health_server, state, metrics = server
    port = health_server.port

    status, body = get(port, "/readyz")
    assert status == 503
    assert body.strip() == "model not loaded"
    assert get(port, "/healthz") == (200, "ok\n")

    state.set_model_loaded()
    state.set_warmed_up()
    state.set_in_group(True)
    assert get(port, "/readyz") == (200, "ok\n")

    metrics.captions.inc()
    status, body = get(port, "/metrics")
    assert status == 200
    assert "caption_worker_captions_total 1.0" in body
    assert "caption_worker_ready 1.0" in body


def test_server_unknown_path_is_404(server):
    health_server, _, _ = server
    assert get(health_server.port, "/nope")[0] == 404

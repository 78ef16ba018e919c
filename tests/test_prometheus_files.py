"""Checks of deploy/prometheus and deploy/grafana: promtool accepts them, and they use only real metrics.

promtool comes with Debian's prometheus package, which deploy/local/setup.sh installs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "caption-worker.json"
PROMTOOL = shutil.which("promtool")
PROMTOOL_TIMEOUT_SECONDS = 60

METRIC_NAME = re.compile(r"\bcaption_worker_[a-z0-9_]+\b")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: run deploy/local/setup.sh (apt-get install prometheus)"
)


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_SECONDS, check=False
    )


def rule_expressions() -> list[str]:
    expressions = []
    for path in RULES_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            expressions += [rule["expr"] for rule in group["rules"]]
    return expressions


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def exported_metric_names() -> set[str]:
    """Return every series name the worker can export, including the suffixes each metric type adds."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
    }
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


@needs_promtool
def test_promtool_accepts_scrape_config():
    result = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_alert_rules():
    result = run_promtool("check", "rules", *map(str, RULES_FILES))

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rule_unit_tests_pass():
    result = run_promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "caption-worker-test.yml"))

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses expressions only inside rule files, so each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expression}
        for index, expression in enumerate(dashboard_expressions())
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run_promtool("check", "rules", str(rules_file))

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_required_panels():
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}

    for title in (
        "Captions per second",
        "End-to-end latency",
        "Time to first token",
        "Generated tokens per second",
        "Requests in flight",
        "KV cache usage",
        "Lag per partition",
        "Dead-letter rate by code",
    ):
        assert title in titles


def test_dashboard_queries_use_no_grafana_variables():
    # Plain PromQL can be pasted into Prometheus and checked by promtool as it is.
    for expression in dashboard_expressions():
        assert "$" not in expression, expression


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_queries_use_only_exported_metrics(source):
    expressions = rule_expressions() if source == "rules" else dashboard_expressions()
    used = {name for expression in expressions for name in METRIC_NAME.findall(expression)}
    unknown = sorted(used - exported_metric_names())

    assert used, f"no caption_worker_ metric found in the {source}"
    assert not unknown, f"{source} use metrics that worker.metrics.Metrics does not export: {unknown}"


def test_compose_mounts_dashboard_where_grafana_loads_it():
    provider = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "caption-worker.yml").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    grafana_volumes = compose["services"]["grafana"]["volumes"]

    assert f"./grafana/caption-worker.json:{provider['providers'][0]['options']['path']}/caption-worker.json:ro" in grafana_volumes


# ---------------------------------------------------------------- deploy/compose.yaml, which runs both


def _compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def test_compose_publishes_ports_on_loopback_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_worker_runs_read_only_as_non_root():
    worker = _compose()["services"]["worker"]

    assert worker["read_only"] is True
    assert worker["tmpfs"] == ["/tmp"]
    assert not worker["user"].startswith("0:")
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert worker["environment"]["AWS_EC2_METADATA_DISABLED"] == "true"


def test_compose_sends_bucket_events_to_input_topic():
    services = _compose()["services"]
    minio = services["minio"]["environment"]
    worker = services["worker"]["environment"]

    assert minio["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"] == worker["CAPTION_INPUT_TOPIC"]
    assert minio["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"] == worker["CAPTION_BOOTSTRAP_SERVERS"]
    assert "--event put" in services["minio-init"]["command"][0]
    assert f"local/{worker['CAPTION_S3_ALLOWED_BUCKETS']}" in services["minio-init"]["command"][0]


def test_compose_mounts_prometheus_config():
    prometheus = _compose()["services"]["prometheus"]

    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

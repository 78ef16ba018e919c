"""Helm chart tests, all offline: `helm lint`, `helm template`, and schema checks of what it renders.

Built-in kinds are validated with kubernetes-validate against the Kubernetes
KUBERNETES_VERSION schemas in strict mode, so an unknown field fails. The
package has no schemas for the CRDs the chart can render (KEDA's ScaledObject
and TriggerAuthentication, the Prometheus Operator's ServiceMonitor and
PrometheusRule), so CRD_SCHEMAS below checks their required fields and the
types this chart sets. They are written for these tests from the CRDs'
documented fields, not copied from the projects' full CRD schemas.

helm comes from deploy/local/install-helm.sh, which puts it in .cache/bin.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path
from types import ModuleType

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.settings import Settings
from worker.stream import CLOSE_TIMEOUT_SECONDS, COMMIT_TIMEOUT_SECONDS, FLUSH_TIMEOUT_SECONDS, TRANSACTION_TIMEOUT_SECONDS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "caption-worker"
HELM = ROOT / ".cache" / "bin" / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules" / "caption-worker.yml"

# A release kubernetes-validate 1.37 ships schemas for, inside the chart's kubeVersion range.
KUBERNETES_VERSION = "1.33.0"
HELM_TIMEOUT_SECONDS = 60

pytestmark = pytest.mark.skipif(
    not HELM.exists(), reason=f"helm not found at {HELM}: run deploy/local/install-helm.sh"
)

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": {"type": "object"}},
}
_SCALE_TARGET = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}, "apiVersion": {"type": "string"}},
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _crd_schema(spec: dict) -> dict:
    return {"type": "object", "required": ["metadata", "spec"], "properties": {"metadata": _METADATA, "spec": spec}}


CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): _crd_schema(
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": _SCALE_TARGET,
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            # KEDA takes every trigger metadata value as a string.
                            "metadata": _STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        }
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd_schema(
        {
            "type": "object",
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string", "minLength": 1},
                            "key": {"type": "string", "minLength": 1},
                        },
                    },
                }
            },
        }
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd_schema(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd_schema(
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": {"type": "string"},
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
    ),
}


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_SECONDS, check=False
    )


def render(*values_files: Path, set_values: tuple[str, ...] = (), set_json: tuple[str, ...] = ()) -> list[dict]:
    """Render the chart and return its manifests; fail the test with helm's message on an error.

    set_values go through --set, which turns non-integer numbers into strings, and
    set_json through --set-json, which keeps JSON types.
    """
    args = ["template", "release", str(CHART), "--namespace", "captions"]
    for path in values_files:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    for item in set_json:
        args += ["--set-json", item]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(*set_values: str) -> str:
    """Render with --set values that must fail, and return helm's error output."""
    args = ["template", "release", str(CHART)]
    for item in set_values:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode != 0, "the chart rendered although it should have failed"
    return result.stderr


def find(manifests: list[dict], kind: str) -> list[dict]:
    return [doc for doc in manifests if doc["kind"] == kind]


def only(manifests: list[dict], kind: str) -> dict:
    found = find(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def pod_spec(manifests: list[dict]) -> dict:
    return only(manifests, "Deployment")["spec"]["template"]["spec"]


def worker_container(manifests: list[dict]) -> dict:
    return pod_spec(manifests)["containers"][0]


def config_data(manifests: list[dict]) -> dict[str, str]:
    """Return the data of the ConfigMap with the CAPTION_* settings (not the scripts ConfigMap)."""
    settings_maps = [doc for doc in find(manifests, "ConfigMap") if "CAPTION_BOOTSTRAP_SERVERS" in doc["data"]]
    assert len(settings_maps) == 1
    return settings_maps[0]["data"]


def env_by_name(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


VALUES_CASES = [None, *CI_VALUES]
VALUES_IDS = ["default", *(path.stem for path in CI_VALUES)]


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_chart_passes_helm_lint(values_file):
    args = ["lint", str(CHART), "--strict"]
    if values_file is not None:
        args += ["--values", str(values_file)]
    result = run_helm(*args)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_rendered_manifests_match_schemas(values_file):
    manifests = render(*([values_file] if values_file else []))

    for doc in manifests:
        crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd_schema is not None:
            jsonschema.validate(doc, crd_schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_each_optional_resource_has_a_ci_values_file():
    rendered_kinds = set()
    for path in CI_VALUES:
        rendered_kinds |= {doc["kind"] for doc in render(path)}

    for kind in ("ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"):
        assert kind in rendered_kinds


def test_optional_resources_are_off_by_default():
    kinds = {doc["kind"] for doc in render()}

    assert kinds == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"}


def test_both_autoscalers_fail_to_render():
    error = render_error("autoscaling.keda.enabled=true", "autoscaling.hpa.enabled=true")

    assert "autoscaling.keda.enabled and autoscaling.hpa.enabled are both true" in error


def test_deployment_sets_replicas_only_without_autoscaler():
    assert only(render(set_values=("replicaCount=3",)), "Deployment")["spec"]["replicas"] == 3
    assert "replicas" not in only(render(CHART / "ci" / "keda-values.yaml"), "Deployment")["spec"]
    assert "replicas" not in only(render(CHART / "ci" / "hpa-values.yaml"), "Deployment")["spec"]


def test_scaled_object_scales_on_input_topic_lag():
    manifests = render(set_values=("autoscaling.keda.enabled=true", "kafka.inputTopic=uploads", "kafka.groupId=cw"))
    scaled = only(manifests, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]

    assert scaled["spec"]["scaleTargetRef"]["name"] == only(manifests, "Deployment")["metadata"]["name"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == "uploads"
    assert trigger["metadata"]["consumerGroup"] == "cw"
    assert trigger["metadata"]["bootstrapServers"] == "kafka:9092"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert "authenticationRef" not in trigger
    assert not find(manifests, "TriggerAuthentication")


def test_lag_threshold_defaults_to_max_in_flight():
    manifests = render(set_values=("autoscaling.keda.enabled=true", "config.maxInFlight=48"))
    explicit = render(set_values=("autoscaling.keda.enabled=true", "autoscaling.keda.lagThreshold=10"))

    assert only(manifests, "ScaledObject")["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "48"
    assert only(explicit, "ScaledObject")["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "10"


def test_sasl_credentials_come_from_existing_secret():
    manifests = render(CHART / "ci" / "sasl-values.yaml")
    env = env_by_name(worker_container(manifests))
    options = json.loads(config_data(manifests)["CAPTION_KAFKA_OPTION"])
    trigger = only(manifests, "ScaledObject")["spec"]["triggers"][0]
    auth = only(manifests, "TriggerAuthentication")["spec"]["secretTargetRef"]

    assert env["CAPTION_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {
        "name": "caption-worker-kafka-user",
        "key": "username",
    }
    assert env["CAPTION_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert options["security.protocol"] == "SASL_SSL"
    assert options["sasl.mechanism"] == "SCRAM-SHA-512"
    assert "sasl.password" not in options
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    assert trigger["authenticationRef"]["name"] == only(manifests, "TriggerAuthentication")["metadata"]["name"]
    assert {ref["parameter"] for ref in auth} == {"username", "password", "ca"}


def test_tls_files_become_kafka_options():
    manifests = render(CHART / "ci" / "tls-values.yaml")
    options = json.loads(config_data(manifests)["CAPTION_KAFKA_OPTION"])
    mounts = {mount["name"]: mount for mount in worker_container(manifests)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(manifests)["volumes"]}
    mount_dir = mounts["kafka-tls"]["mountPath"]

    assert volumes["kafka-tls"]["secret"]["secretName"] == "caption-worker-kafka-tls"
    assert mounts["kafka-tls"]["readOnly"] is True
    assert options["security.protocol"] == "SSL"
    assert options["ssl.ca.location"] == f"{mount_dir}/ca.crt"
    assert options["ssl.certificate.location"] == f"{mount_dir}/user.crt"
    assert options["ssl.key.location"] == f"{mount_dir}/user.key"
    assert options["ssl.endpoint.identification.algorithm"] == "https"


def test_s3_credentials_come_from_existing_secret():
    manifests = render(CHART / "ci" / "s3-credentials-values.yaml")
    env = env_by_name(worker_container(manifests))

    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "minio-caption-worker", "key": "accessKey"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secretKey"
    assert "AWS_ACCESS_KEY_ID" not in env_by_name(worker_container(render()))


def test_service_account_carries_iam_role_annotation():
    manifests = render(CHART / "ci" / "iam-role-values.yaml")
    account = only(manifests, "ServiceAccount")

    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/caption-worker")
    assert pod_spec(manifests)["serviceAccountName"] == account["metadata"]["name"]


def test_containers_run_restricted():
    manifests = render(CHART / "ci" / "model-s3-values.yaml")
    spec = pod_spec(manifests)
    containers = spec["containers"] + spec["initContainers"]

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in containers:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], container["name"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in spec["volumes"]


# Seconds that the worker's shutdown steps after the drain can take: flush, final commit,
# consumer close and engine close take 15 s each (worker/stream.py). A final transaction can take 60 s.
SHUTDOWN_STEPS_SECONDS = FLUSH_TIMEOUT_SECONDS + COMMIT_TIMEOUT_SECONDS + 2 * CLOSE_TIMEOUT_SECONDS
TRANSACTION_STEPS_SECONDS = SHUTDOWN_STEPS_SECONDS - COMMIT_TIMEOUT_SECONDS + 2 * TRANSACTION_TIMEOUT_SECONDS
GRACE_MARGIN_SECONDS = 15


def test_grace_period_covers_every_shutdown_step():
    default = render()
    longer_drain = render(set_json=("config.drainTimeoutSeconds=100.5",))
    exactly_once = render(set_values=("config.delivery=exactly-once",))
    scheduling = render(CHART / "ci" / "scheduling-values.yaml")

    assert pod_spec(default)["terminationGracePeriodSeconds"] == 60 + SHUTDOWN_STEPS_SECONDS + GRACE_MARGIN_SECONDS
    assert pod_spec(longer_drain)["terminationGracePeriodSeconds"] == (
        math.ceil(100.5) + SHUTDOWN_STEPS_SECONDS + GRACE_MARGIN_SECONDS
    )
    assert pod_spec(exactly_once)["terminationGracePeriodSeconds"] == (
        60 + TRANSACTION_STEPS_SECONDS + GRACE_MARGIN_SECONDS
    )
    assert pod_spec(scheduling)["terminationGracePeriodSeconds"] > (
        float(config_data(scheduling)["CAPTION_DRAIN_TIMEOUT_SECONDS"]) + SHUTDOWN_STEPS_SECONDS
    )


def test_grace_period_within_shutdown_bound_fails():
    error = render_error("terminationGracePeriodSeconds=120", "config.drainTimeoutSeconds=60")
    longer = render(set_json=("terminationGracePeriodSeconds=121", "config.drainTimeoutSeconds=60"))

    assert "terminationGracePeriodSeconds (120) must be longer than config.drainTimeoutSeconds (60) plus 60 s" in error
    assert pod_spec(longer)["terminationGracePeriodSeconds"] == 121


def test_grace_period_within_transaction_bound_fails():
    error = render_error("terminationGracePeriodSeconds=150", "config.drainTimeoutSeconds=60",
                         "config.delivery=exactly-once")

    assert "plus 105 s for flushing, committing and closing (165 in all)" in error


def test_probes_check_health_endpoints():
    container = worker_container(render(set_values=("probes.startup.failureThreshold=120",)))

    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["failureThreshold"] == 120
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]


def test_model_from_pvc_is_mounted_read_only():
    manifests = render(CHART / "ci" / "model-pvc-values.yaml")
    mounts = {mount["name"]: mount for mount in worker_container(manifests)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(manifests)["volumes"]}

    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "gemma3-models", "readOnly": True}
    assert mounts["model"]["subPath"] == "gemma-3-4b-it-int4-ov"
    assert config_data(manifests)["CAPTION_MODEL"] == mounts["model"]["mountPath"]


def test_model_from_s3_is_downloaded_by_init_container():
    manifests = render(CHART / "ci" / "model-s3-values.yaml")
    spec = pod_spec(manifests)
    init = spec["initContainers"][0]
    scripts = only([doc for doc in find(manifests, "ConfigMap") if "download_model.py" in doc["data"]], "ConfigMap")

    assert init["image"] == worker_container(manifests)["image"]
    assert init["command"][:2] == ["python", "/etc/caption-worker/scripts/download_model.py"]
    assert init["command"][2:] == ["s3://models/gemma-3-4b-it-int4-ov/", "/models/model"]
    assert {"name": "model", "emptyDir": {"sizeLimit": "20Gi"}} in spec["volumes"]
    assert scripts["data"]["download_model.py"] == (CHART / "files" / "download_model.py").read_text()
    assert "AWS_SECRET_ACCESS_KEY" in env_by_name(init)


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        (("kafka.sasl.enabled=true",), "kafka.sasl.existingSecret is empty"),
        (("kafka.tls.enabled=true",), "kafka.tls.existingSecret is empty"),
        (("kafka.tls.enabled=true", "kafka.tls.existingSecret=s", "kafka.tls.certKey=c"), "must be set together"),
        (("model.source=pvc",), "model.pvc.claimName is empty"),
        (("model.source=s3",), "is not an s3://bucket/prefix URI"),
        (("model.source=http",), "value must be one of"),
        (("replicas=2",), "additional properties 'replicas' not allowed"),
    ],
    ids=["sasl-secret", "tls-secret", "tls-key-pair", "pvc-claim", "s3-uri", "model-source", "unknown-key"],
)
def test_invalid_values_fail_with_message(set_values, message):
    assert message in render_error(*set_values)


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_config_map_is_valid_worker_settings(values_file):
    data = config_data(render(*([values_file] if values_file else [])))
    fields = {f"CAPTION_{name.upper()}": name for name in Settings.model_fields}
    unknown = sorted(set(data) - set(fields))
    # The model directory exists only inside the pod.
    values = {fields[key]: value for key, value in data.items() if key != "CAPTION_MODEL"}

    assert not unknown, f"ConfigMap keys that are no worker setting: {unknown}"
    Settings(**values)


def test_prometheus_rule_renders_deploy_rules():
    rule = only(render(CHART / "ci" / "prometheusrule-values.yaml"), "PrometheusRule")

    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_topology_spread_defaults_to_pod_selector():
    manifests = render(CHART / "ci" / "scheduling-values.yaml")
    constraint = pod_spec(manifests)["topologySpreadConstraints"][0]

    assert constraint["labelSelector"]["matchLabels"] == only(manifests, "Deployment")["spec"]["selector"]["matchLabels"]


def _schema_key_paths(schema: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Return the key paths that values.schema.json names; children of free-form maps are not included."""
    paths = set()
    for key, child in schema.get("properties", {}).items():
        paths.add(prefix + (key,))
        paths |= _schema_key_paths(child, prefix + (key,))
    return paths


def test_values_file_comments_every_key():
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented_paths = _schema_key_paths(schema) - {("global",)}
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    found_paths = set()
    uncommented = []
    for index, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        parents.append((indent, match.group(2)))
        path = tuple(key for _, key in parents)
        if path not in documented_paths:
            continue
        found_paths.add(path)
        if not lines[index - 1].strip().startswith("#"):
            uncommented.append(".".join(path))

    assert not uncommented, f"values.yaml keys without a comment line above them: {uncommented}"
    assert found_paths == documented_paths, f"schema keys missing from values.yaml: {documented_paths - found_paths}"


# ---------------------------------------------------------------- the model download script


def _load_download_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("download_model", CHART / "files" / "download_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_rejects_non_s3_uri(capsys):
    script = _load_download_script()

    assert script.main(["https://bucket/model/", "/tmp/unused"]) == 2
    assert "expected s3://bucket/prefix/" in capsys.readouterr().err


def test_download_script_parses_prefix():
    script = _load_download_script()

    assert script.parse_s3_uri("s3://models/gemma") == ("models", "gemma/")
    assert script.parse_s3_uri("s3://models/") == ("models", "")


def test_download_script_copies_prefix(s3_client, bucket, tmp_path):
    script = _load_download_script()
    s3_client.put_object(Bucket=bucket, Key="gemma/config.json", Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key="gemma/weights/model.bin", Body=b"\x00" * 10)
    s3_client.put_object(Bucket=bucket, Key="gemma/empty-folder/", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="other/readme.txt", Body=b"not part of the model")

    count = script.download_prefix(s3_client, bucket, "gemma/", tmp_path)

    assert count == 2
    assert (tmp_path / "config.json").read_bytes() == b"{}"
    assert (tmp_path / "weights" / "model.bin").read_bytes() == b"\x00" * 10
    assert not (tmp_path / "readme.txt").exists()


def test_download_script_rejects_key_leaving_target(s3_client, bucket, tmp_path):
    script = _load_download_script()
    s3_client.put_object(Bucket=bucket, Key="gemma/../../escape.txt", Body=b"x")

    with pytest.raises(ValueError, match="leaves the target directory"):
        script.download_prefix(s3_client, bucket, "gemma/", tmp_path / "model")

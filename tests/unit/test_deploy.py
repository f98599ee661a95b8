"""deploy/ is checked offline: the Kubernetes manifests against the Kubernetes schemas,
the prometheus-operator resources against their CRD schemas, the alert rules through
promtool (checked and unit-tested), and every metric that a rule or the dashboard
names is one that sagaline serves."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from sagaline.config import Settings
from sagaline.observability.health import READINESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "sagaline-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "sagaline.json"
# JSON schemas of prometheus-operator's CRDs (see tests/data/prometheus-operator/README.md).
CRD_SCHEMAS = ROOT / "tests" / "data" / "prometheus-operator"
# The oldest Kubernetes the manifests support (autoscaling/v2, policy/v1), and the newest
# whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.25.0", latest_version())
OPERATOR_KINDS = {"PodMonitor": "podmonitor", "PrometheusRule": "prometheusrule"}


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def strict(schema: Any) -> Any:
    """The schema with every object closed to properties it does not declare, as the
    Kubernetes API server prunes or refuses them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / f"{OPERATOR_KINDS[kind]}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(strict(schema))  # type: ignore[no-any-return]


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for kind, doc in manifests().items():
        if kind in OPERATOR_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(kind)
    assert sorted(checked) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "PodDisruptionBudget",
        "Secret",
    ]


def test_a_misspelt_field_is_refused_by_the_schema_check() -> None:
    doc = copy.deepcopy(manifests()["Deployment"])
    doc["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kind", sorted(OPERATOR_KINDS))
def test_prometheus_operator_resources_match_their_crd_schemas(kind: str) -> None:
    validator = crd_validator(kind)
    doc = manifests()[kind]
    errors = [e.message for e in validator.iter_errors(doc)]
    assert not errors
    bad = copy.deepcopy(doc)
    bad["spec"]["podMetricEndpoints" if kind == "PodMonitor" else "group"] = []
    assert list(validator.iter_errors(bad)), "the CRD schema check refuses unknown fields"


def test_the_prometheusrule_carries_the_rules_file() -> None:
    assert (
        manifests()["PrometheusRule"]["spec"]["groups"]
        == yaml.safe_load(RULES.read_text())["groups"]
    )


def test_the_worker_deployment_fits_sagalines_settings() -> None:
    docs = manifests()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = {f"SAGALINE_{f.name.upper()}" for f in Settings.__dataclass_fields__.values()}
    assert {k for k in env if k.startswith("SAGALINE_")} <= settings | {"SAGALINE_HOME"}
    # A worker stopped by Kubernetes gets at least a lease to finish its steps.
    assert pod["terminationGracePeriodSeconds"] >= float(env["SAGALINE_LEASE"])
    # Liveness never calls the broker or the store; readiness has time to say why.
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][:3] == ["sagaline", "health", "--liveness"]
    max_age = float(container["livenessProbe"]["exec"]["command"][-1])
    assert max_age > float(env["SAGALINE_HEARTBEAT_INTERVAL"]) * 3
    readiness = container["readinessProbe"]
    assert readiness["exec"]["command"][:3] == ["sagaline", "health", "--readiness"]
    assert readiness["timeoutSeconds"] > READINESS_TIMEOUT
    # The metrics port is the one the worker serves and the one the PodMonitor scrapes.
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["SAGALINE_METRICS_PORT"])
    endpoint = docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # Every selector finds the worker pods; the HPA scales this Deployment.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Deployment", "PodDisruptionBudget", "PodMonitor"):
        selector = docs[kind]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The migration Job upgrades the store the workers use.
    job = docs["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["sagaline", "db", "upgrade"]
    assert job["envFrom"] == container["envFrom"]


def served_metric_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    from sagaline.observability.metrics import SagaMetrics, StoreGauges
    from sagaline.stores.memory import MemoryStore

    registry = CollectorRegistry()
    SagaMetrics(registry)
    registry.register(StoreGauges(lambda: MemoryStore()))
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def named_metrics(text: str) -> set[str]:
    # Not the names of recording rules (saga:sagaline_...:rate5m).
    return set(re.findall(r"(?<![:\w])sagaline_[a-z_]+", text))


def test_rules_and_dashboard_name_only_metrics_sagaline_serves() -> None:
    served = served_metric_names()
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = named_metrics("\n".join(exprs + targets))
    assert used, "the rules and the dashboard query sagaline's metrics"
    assert used <= served, f"not served by sagaline: {sorted(used - served)}"
    # The issue's metric set is all on the dashboard.
    for name in (
        "sagaline_sagas_started_total",
        "sagaline_sagas_finished_total",
        "sagaline_saga_duration_seconds_bucket",
        "sagaline_step_attempts_total",
        "sagaline_step_duration_seconds_bucket",
        "sagaline_step_queue_wait_seconds_bucket",
        "sagaline_compensations_total",
        "sagaline_sweeper_repairs_total",
        "sagaline_sagas_in_progress",
        "sagaline_store_operation_seconds_bucket",
    ):
        assert name in named_metrics("\n".join(targets)), name


def test_the_alerts_the_issue_asks_for_exist() -> None:
    alerts = {
        r["alert"]: r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert {
        "SagalineSagaFailureRatioHigh",
        "SagalineSagasPastDeadline",
        "SagalineSagaParkedFailed",
        "SagalineSweeperRepairsSpiking",
        "SagalineNoWorkerScraped",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "sagaline" and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "saga"} <= variables
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("SAGALINE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is not installed (scripts/ensure-promtool.sh installs it)")
        pytest.skip("promtool is not installed (make promtool)")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "sagaline-rules.yml"),
        ("test", "rules", "sagaline-rules.test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
)
def test_promtool_accepts_the_rules_their_unit_tests_and_the_compose_config(
    args: tuple[str, ...],
) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY / "prometheus"
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The Kubernetes manifests: valid against the Kubernetes schemas (offline, the schemas bundled with
kubernetes-validate), and consistent with the code (queue names, probes, commands)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from config.models import queue_for
from tests.support import ROOT
from web.ops.dashboard import DASHBOARD_PATH

KUBERNETES = ROOT / "deploy" / "kubernetes"
NAMESPACE = "bloomq"  # the Kustomization's
VERSION = "1.30.0"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "Kustomization"}  # KEDA's, Kustomize's: not in the schemas


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERNETES.glob("*.yaml")) for doc in _documents(path)]


@pytest.mark.parametrize(("name", "doc"), [(n, d) for n, d in _all() if d["kind"] not in CUSTOM_KINDS],
                         ids=lambda value: value if isinstance(value, str) else value["kind"])
def test_every_manifest_is_valid_kubernetes(name, doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    (kustomization,) = _documents(KUBERNETES / "kustomization.yaml")
    assert kustomization["namespace"] == NAMESPACE
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}


def _by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _all() if doc["kind"] == kind]


def _by_name(kind: str, name: str) -> dict:
    (doc,) = [doc for doc in _by_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def test_each_models_scaler_watches_the_queues_its_workers_take_from_and_outwaits_their_drain():
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    scalers = _by_kind("ScaledObject")
    assert scalers
    for scaler in scalers:
        assert scaler["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaler["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["bloomq.model"]
        pod = target["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"][:3] == ["python", "-m", "worker"] and model in container["command"]
        # Interactive jobs: the model's Celery queue, one Redis list.
        (redis_trigger,) = [t for t in spec["triggers"] if t["type"] == "redis"]
        assert redis_trigger["metadata"]["listName"] == queue_for(model)
        # Batch lines: one list per API key, summed by the dashboard's figures (tests/web/test_dashboard.py
        # evaluates this trigger's valueLocation against them), read with an operator key from a Secret.
        (batch_trigger,) = [t for t in spec["triggers"] if t["type"] == "metrics-api"]
        meta = batch_trigger["metadata"]
        service = _by_name("Service", "web")
        assert meta["url"] == f"http://web.{NAMESPACE}.svc.cluster.local{DASHBOARD_PATH}"
        assert service["spec"]["ports"][0]["port"] == 80
        assert meta["valueLocation"] == f'models.#(name=="{model}").queue_batch' and meta["format"] == "json"
        assert meta["authMode"] == "bearer"
        auth = _by_name("TriggerAuthentication", batch_trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "token" and ref["key"] in _by_name("Secret", ref["name"])["stringData"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["cooldownPeriod"] > pod["terminationGracePeriodSeconds"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_the_web_is_probed_on_its_health_routes_and_started_as_compose_starts_it():
    (web,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "web"]
    (container,) = web["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert container["command"] == compose["services"]["web"]["command"]

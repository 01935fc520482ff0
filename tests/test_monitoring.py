"""The monitoring profile: every metric the Grafana dashboard queries is one /metrics exports (with a
worker announced and a job finished, so every family has samples), and the dashboard and Prometheus
files are the ones docker-compose.yml mounts."""

from __future__ import annotations

import json
import re

import yaml

from config.settings import Settings
from jobs.metrics import record_batch_sizes
from jobs.schema import JobOutput
from jobs.workers import WorkerInfo
from tests.support import ROOT
from web import create_app

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "bloomq.json"


def _queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    names = set()
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}", "", expr)
        names |= {name for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)
                  if name.startswith("bloomq_")}
    return names


def _exported_metrics(redis_server) -> set[str]:
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom"))
    service = app.extensions["bloomq"]
    service.directory.announce(WorkerInfo(name="tiny-bloom@box.gpu0", instance="tiny-bloom@box.gpu0:1",
                                          model="tiny-bloom", source="/models/tiny-bloom", host="box",
                                          device="cuda:0", devices=["0"], dtype="bfloat16", pid=1,
                                          batch_capacity=8, jobs_running=1), ttl_seconds=30)
    client = app.test_client()
    job_id = client.post("/api/v1/jobs", json={"inputs": "hi"}).get_json()["id"]
    service.store.start(job_id, "tiny-bloom@box.gpu0", "tiny-bloom@box.gpu0:1")
    service.store.succeed(job_id, JobOutput(generated_text="x", generated_tokens=1, prompt_tokens=1), 0.1, attempt=1,
                          first_token_seconds=0.05)
    record_batch_sizes(service.store.redis, "tiny-bloom", {1: 1})  # a worker's decode step
    text = client.get("/metrics").get_data(as_text=True)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_grafana_dashboard_queries_is_exported(redis_server, redis_client):
    queried = _queried_metrics()
    exported = _exported_metrics(redis_server)
    assert queried <= exported, sorted(queried - exported)


def test_the_monitoring_profile_runs_prometheus_and_grafana_with_the_files_here():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    mounts = [volume.split(":")[0] for name in ("prometheus", "grafana") for volume in services[name]["volumes"]]
    for mount in mounts:
        if mount.startswith("./"):
            assert (ROOT / mount).exists(), mount
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["web:5000"]


def test_an_alert_fires_for_a_model_with_queued_jobs_and_no_worker_on_metrics_the_web_exports(redis_server):
    # The web stays ready without workers (its readiness is its own): the alert is where that shows.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounted = dict(volume.split(":")[:2] for volume in compose["services"]["prometheus"]["volumes"])
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (rules_file,) = config["rule_files"]
    (source,) = [local for local, inside in mounted.items() if inside == rules_file]
    rules = yaml.safe_load((ROOT / source).read_text())
    (rule,) = [rule for group in rules["groups"] for rule in group["rules"]
               if rule["alert"] == "BloomqModelHasQueuedJobsAndNoWorker"]
    used = set(re.findall(r"bloomq_[a-z_]+", rule["expr"]))
    assert used == {"bloomq_queue_depth", "bloomq_live_workers"}
    assert used <= _exported_metrics(redis_server)
    assert rule["for"] == "5m"

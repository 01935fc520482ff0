"""The live dashboard's figures against the job store, its caching, and who may see it."""

from __future__ import annotations

import re

import pytest
import yaml

from config.settings import Settings
from jobs.schema import JobError, JobOutput
from jobs.workers import WorkerInfo
from tests.support import ROOT, csrf_token
from web import create_app

OPS, ALICE = "operator-key-789", "alice-key-123"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def app(redis_server, redis_client):
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", api_keys=(ALICE,),
                        operator_keys=(OPS,))
    app = create_app(settings)
    app.config["TESTING"] = True
    app.extensions["bloomq"].directory.announce(WorkerInfo(
        name="tiny-bloom@box.gpu0", instance="tiny-bloom@box.gpu0:7", model="tiny-bloom", host="box",
        device="cuda:0", devices=["0"], dtype="bfloat16", pid=7, batch_capacity=8, jobs_running=2, kv_blocks=100,
        kv_blocks_in_use=30, prefills=4, restarts=2), ttl_seconds=30)
    return app


def test_the_figures_match_the_job_store(app):
    client = app.test_client()
    store = app.extensions["bloomq"].store
    ids = [client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(ALICE)).get_json()["id"]
           for _ in range(5)]
    for job_id, tokens in zip(ids[:3], (7, 11, 13), strict=True):
        store.start(job_id, "tiny-bloom@box.gpu0", "tiny-bloom@box.gpu0:7")
        store.succeed(job_id, JobOutput(generated_text="x", generated_tokens=tokens, prompt_tokens=1), 0.1, attempt=1,
                      first_token_seconds=0.02)
    store.start(ids[3], "tiny-bloom@box.gpu0", "tiny-bloom@box.gpu0:7")
    store.fail(ids[3], JobError(type="generation_error", message="bad row"), attempt=1)
    figures = client.get("/api/v1/dashboard", headers=bearer(OPS)).get_json()
    (model,) = figures["models"]
    assert model["name"] == "tiny-bloom"
    assert model["queue_interactive"] == store.redis.llen("bloomq.tiny-bloom") == 5  # messages, no worker took them
    assert model["finished_last_5m"] == 4 and model["failures_last_5m"] == {"generation_error": 1}
    assert model["series"]["tokens_per_minute"][-1] == 31 and len(model["series"]["tokens_per_minute"]) == 15
    assert model["tokens_per_second"] == round(31 / 300, 3)
    assert model["queue_wait_p50"] is not None and model["queue_wait_p50"] <= model["queue_wait_p95"]
    assert 0.02 <= model["first_token_p50"] <= model["first_token_p95"]  # at least the attempt's own 0.02 s
    assert (model["workers"], model["jobs_running"], model["rows_capacity"]) == (1, 2, 8)
    (worker,) = figures["workers"]
    assert (worker["host"], worker["kv_blocks_in_use"], worker["kv_blocks"], worker["prefills"]) == ("box", 30, 100, 4)
    assert worker["restarts"] == 2
    # Gathered once for every viewer for a couple of seconds: a second look reads nothing new.
    again = client.get("/api/v1/dashboard", headers=bearer(OPS)).get_json()
    assert again["generated_at"] == figures["generated_at"]


def test_only_operators_see_the_dashboard(app):
    client = app.test_client()
    assert client.get("/api/v1/dashboard", headers=bearer(ALICE)).status_code == 403
    assert client.get("/api/v1/dashboard").status_code == 401
    for key, status in ((ALICE, 403), (OPS, 200)):
        browser = app.test_client()
        token = csrf_token(browser.get("/login").get_data(as_text=True))
        browser.post("/login", data={"api_key": key, "csrf_token": token})
        page = browser.get("/dashboard")
        assert page.status_code == status
    html = page.get_data(as_text=True)
    assert "tiny-bloom" in html and 'data-figure="tokens_per_second"' in html


def _gjson_model_field(path: str, figures: dict) -> object:
    """The one GJSON form the KEDA batch trigger uses: ``models.#(name=="<model>").<field>``."""
    match = re.fullmatch(r'models\.#\(name=="([^"]+)"\)\.(\w+)', path)
    assert match, path
    (row,) = [row for row in figures["models"] if row["name"] == match[1]]
    return row[match[2]]


def test_the_kubernetes_batch_trigger_reads_every_keys_waiting_lines(app):
    """KEDA's metrics-api trigger scales a model's workers on its batch backlog: lines wait in one list per
    API key, so the trigger reads their sum from these figures (the manifest's own path, evaluated here)."""
    manifest = ROOT / "deploy" / "kubernetes" / "scaledobject-bloom-560m.yaml"
    (scaler,) = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "metrics-api"]
    path = trigger["metadata"]["valueLocation"].replace("bloom-560m", "tiny-bloom")
    queue = app.extensions["bloomq"].batch_queue
    for owner, job_id in (("alice", "j1"), ("alice", "j2"), ("bob", "j3"), (None, "j4")):
        queue.push("tiny-bloom", owner, job_id)
    figures = app.test_client().get("/api/v1/dashboard", headers=bearer(OPS)).get_json()
    assert _gjson_model_field(path, figures) == 4

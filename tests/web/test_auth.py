"""API keys, ownership, the signed-in web session with CSRF, and per-key rate limits."""

import hashlib

import pytest

from config.settings import Settings
from tests.support import csrf_token
from web import create_app

ALICE, BOB = "alice-key-123", "bob-key-456"


@pytest.fixture()
def keyed(redis_server, redis_client, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# one key per line\nsha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", api_keys=(ALICE,),
                        api_keys_file=str(keys_file), rate_limit="3/minute")
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_api_needs_a_valid_key_and_says_how(keyed):
    client = keyed.test_client()
    for headers in ({}, bearer("wrong")):
        response = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["type"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200  # health stays open
    assert client.get("/api/v1/openapi.json").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(ALICE)).status_code == 403  # operators only


def test_a_job_is_visible_only_to_the_key_that_made_it(keyed):
    client = keyed.test_client()
    job = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(ALICE)).get_json()
    assert job["owner"].startswith("key:") and ALICE not in job["owner"]
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(ALICE)).status_code == 200
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(BOB)).status_code == 404  # hashed key from file
    assert client.get(f"/api/v1/jobs/{job['id']}?wait=1", headers=bearer(BOB)).status_code == 404
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(BOB)).status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}/events", headers=bearer(BOB)).status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(ALICE)).get_json()["status"] == "queued"


def test_idempotency_keys_are_per_api_key(keyed):
    client = keyed.test_client()
    body = {"inputs": "hi"}
    a = client.post("/api/v1/jobs", json=body, headers={**bearer(ALICE), "Idempotency-Key": "k"})
    b = client.post("/api/v1/jobs", json=body, headers={**bearer(BOB), "Idempotency-Key": "k"})
    assert (a.status_code, b.status_code) == (202, 202) and a.get_json()["id"] != b.get_json()["id"]


def test_submissions_are_rate_limited_per_key(keyed):
    client = keyed.test_client()
    codes = [client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(ALICE)).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    limited = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(ALICE))
    assert limited.is_json and int(limited.headers["Retry-After"]) > 0
    assert client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(BOB)).status_code == 202


def test_web_pages_sign_in_with_a_key_and_act_for_it(keyed):
    client = keyed.test_client()
    page = client.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    login_page = client.get("/login").get_data(as_text=True)
    assert "API keys are off" not in login_page
    token = csrf_token(login_page)
    assert client.post("/login", data={"api_key": "nope", "csrf_token": token}).status_code == 401
    assert client.post("/login", data={"api_key": ALICE, "csrf_token": token}).status_code == 302
    form = client.get("/").get_data(as_text=True)
    response = client.post("/", data={"inputs": "Hello", "csrf_token": csrf_token(form)})
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    # The session reads through the API as the same key; Bob does not see the job.
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert keyed.test_client().get(f"/api/v1/jobs/{job_id}", headers=bearer(BOB)).status_code == 404
    # A write through the API from the session needs the page's CSRF token.
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 400
    cancel = client.post(f"/api/v1/jobs/{job_id}/cancel", headers={"X-CSRFToken": csrf_token(form)})
    assert cancel.status_code == 200 and cancel.get_json()["outcome"] == "canceled"


def test_login_never_redirects_off_site(keyed):
    client = keyed.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login?next=//evil.example/x", data={"api_key": ALICE, "csrf_token": token})
    assert response.headers["Location"] == "/"


OPS = "operator-key-789"
WHERE_IT_RUNS = {"name", "instance", "host", "pid", "source", "device", "devices"}


def _announce_worker(app) -> None:
    from jobs.workers import WorkerInfo

    info = WorkerInfo(name="tiny-bloom@gpu-box-7.gpu0", instance="tiny-bloom@gpu-box-7.gpu0:4242", model="tiny-bloom",
                      source="/srv/models/tiny-bloom", host="gpu-box-7", device="cuda:0", devices=["0"],
                      dtype="bfloat16", pid=4242, batch_capacity=8, jobs_running=3)
    app.extensions["bloomq"].directory.announce(info, ttl_seconds=30)


@pytest.fixture()
def with_operators(redis_server, redis_client, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
    # Bob is an operator by his key's hash only, as his key is kept in the file.
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", api_keys=(ALICE,),
                        api_keys_file=str(keys_file),
                        operator_keys=(OPS, f"sha256:{hashlib.sha256(BOB.encode()).hexdigest().upper()}"))
    app = create_app(settings)
    app.config["TESTING"] = True
    _announce_worker(app)
    return app


def test_only_operator_keys_see_where_workers_run(with_operators):
    client = with_operators.test_client()
    (summary,) = client.get("/api/v1/workers", headers=bearer(ALICE)).get_json()["workers"]
    assert set(summary) == {"model", "batch_capacity", "jobs_running", "last_seen"}
    assert (summary["model"], summary["batch_capacity"], summary["jobs_running"]) == ("tiny-bloom", 8, 3)
    assert "gpu-box-7" not in str(summary) and "/srv/models" not in str(summary)
    for operator in (OPS, BOB):
        (full,) = client.get("/api/v1/workers", headers=bearer(operator)).get_json()["workers"]
        assert WHERE_IT_RUNS <= set(full)
        assert (full["host"], full["pid"], full["source"]) == ("gpu-box-7", 4242, "/srv/models/tiny-bloom")
    # An operator key is an API key like any other (its own jobs, 404 for the others').
    job = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(OPS)).get_json()
    assert job["owner"].startswith("key:")
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(ALICE)).status_code == 404
    assert client.get("/api/v1/workers").status_code == 401
    assert client.get("/metrics", headers=bearer(OPS)).status_code == 200
    assert client.get("/metrics", headers=bearer(ALICE)).status_code == 403


def test_an_operator_signed_in_on_the_pages_is_an_operator_through_the_session(with_operators):
    client = with_operators.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    assert client.post("/login", data={"api_key": OPS, "csrf_token": token}).status_code == 302
    (full,) = client.get("/api/v1/workers").get_json()["workers"]
    assert full["host"] == "gpu-box-7"


def test_operator_keys_alone_turn_auth_on(redis_server, redis_client):
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", operator_keys=(OPS,)))
    client = app.test_client()
    assert client.get("/api/v1/workers").status_code == 401
    assert client.get("/api/v1/workers", headers=bearer(OPS)).status_code == 200


def test_with_auth_off_everyone_sees_where_workers_run(app, client):
    _announce_worker(app)
    (full,) = client.get("/api/v1/workers").get_json()["workers"]
    assert WHERE_IT_RUNS <= set(full) and full["host"] == "gpu-box-7" and full["source"] == "/srv/models/tiny-bloom"


def test_where_a_job_ran_is_shown_only_to_operator_keys(with_operators):
    client = with_operators.test_client()
    mine = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(ALICE)).get_json()
    theirs = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(OPS)).get_json()
    store = with_operators.extensions["bloomq"].store
    for job in (mine, theirs):
        store.start(job["id"], "tiny-bloom@gpu-box-7.gpu0", "tiny-bloom@gpu-box-7.gpu0:4242")
    seen = client.get(f"/api/v1/jobs/{mine['id']}", headers=bearer(ALICE)).get_json()
    assert seen["status"] == "running" and seen["worker"] is None and seen["worker_instance"] is None
    listed = client.get("/api/v1/jobs", headers=bearer(ALICE)).get_json()["jobs"]
    assert "gpu-box-7" not in str(listed)
    shown = client.get(f"/api/v1/jobs/{theirs['id']}", headers=bearer(OPS)).get_json()
    assert shown["worker_instance"] == "tiny-bloom@gpu-box-7.gpu0:4242"

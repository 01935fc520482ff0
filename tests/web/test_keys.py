"""API keys made, changed and revoked at run time (over /api/v1/keys, stored as hashes in Redis), and
browser sessions that end when their key is revoked."""

from __future__ import annotations

import pytest

from config.settings import Settings
from tests.support import csrf_token
from web import create_app

OPS, ALICE = "operator-key-789", "alice-key-123"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def keyed(redis_server, redis_client):
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", api_keys=(ALICE,),
                        operator_keys=(OPS,), public_url="https://bloomq.example.org")
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


def _create(client, **body):
    return client.post("/api/v1/keys", json=body, headers=bearer(OPS))


def test_an_operator_makes_a_key_that_works_at_once_and_lists_it_without_its_secret(keyed, redis_client):
    client = keyed.test_client()
    made = _create(client, name="team-a", tokens_per_day=600, max_active_jobs=2)
    assert made.status_code == 201 and made.headers["Location"].endswith("/api/v1/keys/team-a")
    key = made.get_json()
    assert key["secret"].startswith("bq_") and len(key["secret"]) > 40
    assert (key["name"], key["role"], key["tokens_per_day"], key["max_active_jobs"], key["file_bytes"]) == \
        ("team-a", "user", 600, 2, None)
    job = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(key["secret"]))
    assert job.status_code == 202 and job.get_json()["owner"] == key["owner"]
    listed = client.get("/api/v1/keys", headers=bearer(OPS)).get_json()["keys"]
    assert [k["name"] for k in listed] == ["team-a"] and "secret" not in listed[0]
    assert listed[0]["last_used"] is not None  # its job just now
    assert client.get("/api/v1/keys/team-a", headers=bearer(OPS)).get_json()["owner"] == key["owner"]
    # No secret anywhere in Redis: not in any key's name, nor in any value.
    for name in redis_client.scan_iter():
        assert key["secret"].encode() not in name
        kind = redis_client.type(name)
        if kind == b"hash":
            values = [v for pair in redis_client.hgetall(name).items() for v in pair]
        elif kind == b"string":
            values = [redis_client.get(name)]
        else:
            values = []
        assert all(key["secret"].encode() not in v for v in values), name


def test_limits_change_and_a_null_removes_one(keyed):
    client = keyed.test_client()
    _create(client, name="team-b", tokens_per_day=100, file_bytes=1000)
    changed = client.patch("/api/v1/keys/team-b", json={"tokens_per_day": 500, "file_bytes": None},
                           headers=bearer(OPS))
    assert changed.status_code == 200
    body = changed.get_json()
    assert (body["tokens_per_day"], body["file_bytes"], body["max_active_jobs"]) == (500, None, None)
    assert client.patch("/api/v1/keys/nobody", json={"tokens_per_day": 1}, headers=bearer(OPS)).status_code == 404


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "has space"}, "name"), ({"name": ""}, "name"), ({"name": "x", "role": "root"}, "role"),
    ({"name": "x", "tokens_per_day": 0}, "tokens_per_day"), ({"name": "x", "max_active_jobs": "2"}, "max_active_jobs"),
    ({"name": "x", "secret": "mine"}, "secret"), ({}, "name"),
])
def test_a_bad_key_request_is_a_422_naming_the_field(keyed, body, field):
    response = _create(keyed.test_client(), **body)
    assert response.status_code == 422, response.get_json()
    assert field in [f["name"] for f in response.get_json()["error"]["fields"]]


def test_a_name_is_taken_once(keyed):
    client = keyed.test_client()
    assert _create(client, name="dup").status_code == 201
    again = _create(client, name="dup")
    assert again.status_code == 409 and again.get_json()["error"]["fields"][0]["name"] == "name"


def test_only_operators_manage_keys(keyed):
    client = keyed.test_client()
    assert client.get("/api/v1/keys").status_code == 401
    assert client.get("/api/v1/keys", headers=bearer(ALICE)).status_code == 403
    assert client.post("/api/v1/keys", json={"name": "mine"}, headers=bearer(ALICE)).status_code == 403
    made = _create(client, name="ops-2", role="operator").get_json()
    assert client.get("/api/v1/keys", headers=bearer(made["secret"])).status_code == 200  # an operator too
    user = _create(client, name="user-2").get_json()
    assert client.delete("/api/v1/keys/ops-2", headers=bearer(user["secret"])).status_code == 403


def test_a_revoked_key_is_refused_at_its_next_request_and_its_browser_session_ends(keyed):
    client = keyed.test_client()
    secret = _create(client, name="leaving").get_json()["secret"]
    browser = keyed.test_client()
    token = csrf_token(browser.get("/login").get_data(as_text=True))
    assert browser.post("/login", data={"api_key": secret, "csrf_token": token}).status_code == 302
    assert browser.get("/").status_code == 200
    assert browser.get("/api/v1/jobs").status_code == 200
    cookie = browser.get_cookie("session")
    assert cookie.http_only and cookie.secure and cookie.same_site == "Lax" and cookie.expires is not None

    revoked = client.delete("/api/v1/keys/leaving", headers=bearer(OPS))
    assert revoked.status_code == 200 and revoked.get_json() == {"name": "leaving", "revoked": True}
    assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 401
    assert browser.get("/api/v1/jobs").status_code == 401
    page = browser.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert client.delete("/api/v1/keys/leaving", headers=bearer(OPS)).status_code == 404
    assert client.post("/api/v1/keys", json={"name": "leaving"}, headers=bearer(OPS)).status_code == 201


def test_sign_in_attempts_are_rate_limited_per_address(keyed):
    browser = keyed.test_client()
    token = csrf_token(browser.get("/login").get_data(as_text=True))
    codes = [browser.post("/login", data={"api_key": f"guess-{i}", "csrf_token": token}).status_code
             for i in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429


def test_with_auth_off_the_keys_api_says_how_to_turn_it_on(client):
    response = client.post("/api/v1/keys", json={"name": "x"})
    assert response.status_code == 409 and "BLOOMQ_OPERATOR_KEYS" in response.get_json()["error"]["message"]


def test_operators_list_any_keys_jobs_and_users_only_their_own(keyed):
    client = keyed.test_client()
    made = _create(client, name="team-c").get_json()
    job = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers=bearer(made["secret"])).get_json()
    for key in ("team-c", made["owner"]):
        listed = client.get(f"/api/v1/jobs?key={key}", headers=bearer(OPS)).get_json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/api/v1/jobs", headers=bearer(OPS)).get_json()["jobs"] == []  # the operator's own
    refused = client.get("/api/v1/jobs?key=team-c", headers=bearer(ALICE))
    assert refused.status_code == 403 and refused.get_json()["error"]["fields"][0]["name"] == "key"
    assert client.get("/api/v1/jobs?key=nobody", headers=bearer(OPS)).status_code == 404
    assert client.get("/api/v1/usage?key=team-c", headers=bearer(OPS)).get_json()["key"] == made["owner"]

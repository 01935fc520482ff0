"""Cancel, idempotency, deadlines, webhooks validation and the event stream (no worker: the test
plays the worker's part through the store)."""

import json

import pytest

from config.settings import Settings
from jobs.progress import ProgressUpdate
from jobs.schema import JobOutput
from web import create_app


def _submit(client, body, **kwargs):
    return client.post("/api/v1/jobs", json=body, **kwargs)


def _store(app):
    return app.extensions["bloomq"].store


def test_cancel_a_queued_job_then_again(client):
    job = _submit(client, {"inputs": "hi"}).get_json()
    first = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 200
    assert first.get_json()["outcome"] == "canceled" and first.get_json()["job"]["status"] == "canceled"
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel").get_json()
    assert again["outcome"] == "already_final" and "nothing was changed" in again["message"]


def test_cancel_a_running_job_asks_its_worker(client, app):
    job = _submit(client, {"inputs": "hi"}).get_json()
    _store(app).start(job["id"], "w")
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    body = response.get_json()
    assert body["outcome"] == "cancel_requested" and body["job"]["cancel_requested"] is True


def test_cancel_unknown_job_is_404(client):
    assert client.post("/api/v1/jobs/00000000-0000-4000-8000-000000000000/cancel").status_code == 404


def test_idempotency_key_returns_the_same_job_or_409(client, redis_client):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    first = _submit(client, body, headers={"Idempotency-Key": "abc-1"})
    second = _submit(client, body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and second.status_code == 200
    assert first.get_json()["id"] == second.get_json()["id"]
    assert redis_client.llen("bloomq.tiny-bloom") == 1  # queued once
    conflict = _submit(client, {"inputs": "other"}, headers={"Idempotency-Key": "abc-1"})
    assert conflict.status_code == 409 and conflict.get_json()["error"]["type"] == "idempotency_conflict"
    other_key = _submit(client, body, headers={"Idempotency-Key": "abc-2"})
    assert other_key.status_code == 202 and other_key.get_json()["id"] != first.get_json()["id"]


def test_every_job_gets_a_deadline_and_timeout_is_capped(client):
    job = _submit(client, {"inputs": "hi", "timeout": 30}).get_json()
    assert job["deadline"] > job["created_at"]
    too_long = _submit(client, {"inputs": "hi", "timeout": 10**7})
    assert too_long.status_code == 422 and too_long.get_json()["error"]["fields"][0]["name"] == "timeout"


def test_queued_job_past_its_deadline_reads_as_expired(client):
    import time

    job = _submit(client, {"inputs": "hi", "timeout": 0.2}).get_json()
    time.sleep(0.3)
    polled = client.get(f"/api/v1/jobs/{job['id']}").get_json()
    assert polled["status"] == "failed" and polled["error"]["type"] == "expired"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/hook", "http or https"),
        ("http://127.0.0.1:9/hook", "non-public"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/hook", "non-public"),
        ("http://user:pw@example.com/hook", "credentials"),
    ],
)
def test_webhooks_to_internal_addresses_are_refused(redis_server, redis_client, url, message):
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", webhook_secret="s"))
    response = app.test_client().post("/api/v1/jobs", json={"inputs": "hi", "webhook": url})
    assert response.status_code == 422
    field = response.get_json()["error"]["fields"][0]
    assert field["name"] == "webhook" and message in field["message"]


def test_allow_listed_webhook_host_is_accepted(redis_server, redis_client):
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", webhook_secret="s",
                        webhook_allow=("127.0.0.0/8",))
    client = create_app(settings).test_client()
    body = {"inputs": "hi", "webhook": "http://127.0.0.1:8080/hook", "webhook_events": ["started", "completed"]}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 202
    assert response.get_json()["webhook_events"] == ["started", "completed"]


def test_webhooks_need_a_configured_secret(client):
    response = _submit(client, {"inputs": "hi", "webhook": "https://example.com/hook"})
    assert response.status_code == 422 and "BLOOMQ_WEBHOOK_SECRET" in response.get_json()["error"]["fields"][0]["message"]


def _parse_sse(text):
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith((":", "retry")))
        if fields:
            events.append(fields)
    return events


def test_event_stream_of_a_finished_job_replays_and_closes(client, app):
    job = _submit(client, {"inputs": "hi"}).get_json()
    store = _store(app)
    store.start(job["id"], "w")
    store.publish_progress([ProgressUpdate(job["id"], "Hel", 1, attempt=1),
                            ProgressUpdate(job["id"], "lo 你好", 2, attempt=1)])
    store.succeed(job["id"], JobOutput(generated_text="Hello 你好", generated_tokens=2, finish_reason="length"), 0.1)
    response = client.get(f"/api/v1/jobs/{job['id']}/events")
    assert response.mimetype == "text/event-stream"
    events = _parse_sse(response.get_data(as_text=True))
    assert [e["event"] for e in events] == ["status", "status", "token", "token", "status", "done"]
    text = "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "token")
    assert text == "Hello 你好"
    done = json.loads(events[-1]["data"])
    assert done["status"] == "succeeded" and done["urls"]["self"] == f"/api/v1/jobs/{job['id']}"
    # Resume after the first token: no gap, no repeat.
    resumed = _parse_sse(client.get(f"/api/v1/jobs/{job['id']}/events",
                                    headers={"Last-Event-ID": events[2]["id"]}).get_data(as_text=True))
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]


def test_event_stream_errors(client):
    assert client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/events").status_code == 404
    job = _submit(client, {"inputs": "hi"}).get_json()
    bad = client.get(f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 422

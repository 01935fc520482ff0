"""Quotas of keys made over the API (tokens per day, jobs at once, file bytes), settled when jobs end, and
the usage report: the web app over a real Redis, jobs finished through the store as a worker would."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest

from config.settings import Settings
from jobs.intake import BatchIntake
from jobs.quotas import QuotaExceeded
from jobs.schema import JobOutput
from tests.support import csrf_token
from web import create_app
from web.pages.charts import nice_top, stacked_bars

OPS = "operator-key-789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def app(redis_server, redis_client):
    settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", operator_keys=(OPS,))
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


def _key(client, **limits) -> str:
    made = client.post("/api/v1/keys", json={"name": f"k{len(limits)}{sorted(limits.items())}".replace(" ", "")
                                             .replace("'", "").replace("(", "").replace(")", "")
                                             .replace(",", "-").replace("[", "").replace("]", "")[:60], **limits},
                       headers=bearer(OPS))
    assert made.status_code == 201, made.get_json()
    return made.get_json()["secret"]


def _submit(client, secret: str, tokens: int = 20, path: str = "/api/v1/jobs"):
    return client.post(path, json={"inputs": "hi", "parameters": {"max_new_tokens": tokens}}, headers=bearer(secret))


def _finish(app, job_id: str, prompt_tokens: int, generated: int) -> None:
    store = app.extensions["bloomq"].store
    store.start(job_id, "tiny-bloom@test.cpu", "tiny-bloom@test.cpu:1")
    output = JobOutput(generated_text="x" * generated, generated_tokens=generated, prompt_tokens=prompt_tokens)
    assert store.succeed(job_id, output, 0.1, attempt=1) is not None


def test_tokens_per_day_hold_each_jobs_budget_and_give_back_what_it_did_not_use(app):
    client = app.test_client()
    secret = _key(client, tokens_per_day=100)
    # The web has no copy of this tokenizer: "hi" is held as 2 tokens (its bytes), + 20 new = 22 a job.
    ids = [_submit(client, secret).get_json()["id"] for _ in range(4)]  # 88 held
    over = _submit(client, secret)
    assert over.status_code == 429
    error = over.get_json()["error"]
    assert error["type"] == "quota_exceeded" and error["limit"] == "tokens_per_day" and error["limit_value"] == 100
    assert 0 < int(over.headers["Retry-After"]) <= 24 * 3600
    _finish(app, ids[0], prompt_tokens=1, generated=5)  # used 6 of its 22: 16 come back, 72 held
    assert _submit(client, secret).status_code == 202  # 94
    assert _submit(client, secret, tokens=5).status_code == 429  # 94 + 7 > 100
    assert client.post("/v1/completions", json={"model": "tiny-bloom", "prompt": "hi", "max_tokens": 20},
                       headers=bearer(secret)).get_json()["error"]["code"] == "quota_exceeded"
    assert client.post("/models/tiny-bloom", json={"inputs": "hi", "parameters": {"max_new_tokens": 20}},
                       headers=bearer(secret)).status_code == 429


def test_max_active_jobs_counts_jobs_queued_or_running_and_frees_a_slot_when_one_ends(app):
    client = app.test_client()
    secret = _key(client, max_active_jobs=2)
    first, second = (_submit(client, secret).get_json()["id"] for _ in range(2))
    third = _submit(client, secret)
    assert third.status_code == 429 and third.get_json()["error"]["limit"] == "max_active_jobs"
    assert client.post(f"/api/v1/jobs/{first}/cancel", headers=bearer(secret)).status_code == 200  # queued: final
    assert _submit(client, secret).status_code == 202  # the canceled job's slot
    assert _submit(client, secret).status_code == 429
    _finish(app, second, prompt_tokens=1, generated=3)
    assert _submit(client, secret).status_code == 202  # the finished job's slot
    owner = client.get("/api/v1/keys", headers=bearer(OPS)).get_json()["keys"][0]["owner"]
    assert app.extensions["bloomq"].quotas.in_use(owner)["active_jobs"] == 2


def test_several_jobs_hold_all_or_nothing_and_an_idempotent_repeat_holds_nothing_more(app):
    client = app.test_client()
    secret = _key(client, max_active_jobs=3)
    owner = client.get("/api/v1/keys", headers=bearer(OPS)).get_json()["keys"][0]["owner"]
    headers = {**bearer(secret), "Idempotency-Key": "once"}
    job = {"inputs": "hi", "parameters": {"max_new_tokens": 5}}
    made = client.post("/api/v1/jobs", json=job, headers=headers)
    assert made.status_code == 202
    assert client.post("/api/v1/jobs", json=job, headers=headers).status_code == 200  # the same job again
    quotas = app.extensions["bloomq"].quotas
    assert quotas.in_use(owner)["active_jobs"] == 1
    held = app.extensions["bloomq"].store.get(made.get_json()["id"])
    with pytest.raises(QuotaExceeded):
        quotas.hold(owner, [held, held, held], tokens_per_day=None, max_active_jobs=3)
    assert quotas.in_use(owner) == {"tokens_today": held.token_budget, "active_jobs": 1}  # nothing half-held


def test_usage_counts_each_finished_job_once_by_model_and_day_and_operators_see_every_key(app):
    client = app.test_client()
    alice, bob = _key(client, tokens_per_day=10_000), _key(client, max_active_jobs=50)
    a1, a2 = (_submit(client, alice).get_json()["id"] for _ in range(2))
    b1 = _submit(client, bob).get_json()["id"]
    _finish(app, a1, prompt_tokens=2, generated=7)
    _finish(app, a2, prompt_tokens=3, generated=11)
    _finish(app, b1, prompt_tokens=4, generated=1)
    store = app.extensions["bloomq"].store
    output = JobOutput(generated_text="late", generated_tokens=99, prompt_tokens=99)
    assert store.succeed(a1, output, 0.1, attempt=1) is None  # a late second result: refused, not counted
    mine = client.get("/api/v1/usage", headers=bearer(alice)).get_json()
    assert mine["data"] == [{"model": "tiny-bloom", "prompt_tokens": 5, "completion_tokens": 18, "jobs": 2}]
    assert mine["totals"] == {"prompt_tokens": 5, "completion_tokens": 18, "jobs": 2}
    today = datetime.now(UTC).date().isoformat()
    by_day = client.get(f"/api/v1/usage?group_by=day&start={today}&end={today}", headers=bearer(alice)).get_json()
    assert by_day["data"] == [{"day": today, "prompt_tokens": 5, "completion_tokens": 18, "jobs": 2}]
    assert client.get("/api/v1/usage?key=all", headers=bearer(alice)).status_code == 403
    every = client.get("/api/v1/usage?key=all&group_by=key", headers=bearer(OPS)).get_json()
    assert sorted(row["jobs"] for row in every["data"]) == [1, 2] and every["totals"]["completion_tokens"] == 19
    bad = client.get("/api/v1/usage?start=yesterday", headers=bearer(alice))
    assert bad.status_code == 422 and bad.get_json()["error"]["fields"][0]["name"] == "start"


def _upload(client, secret: str, lines: int) -> str:
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny-bloom", "prompt": "hi", "max_tokens": 3}} for i in range(lines)]
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "b.jsonl")},
                         content_type="multipart/form-data", headers=bearer(secret))
    assert upload.status_code == 200, upload.get_json()
    return upload.get_json()["id"]


def test_a_batch_over_the_quota_is_refused_whole_and_file_bytes_cap_the_keys_files(app):
    client = app.test_client()
    secret = _key(client, max_active_jobs=2, file_bytes=400)
    file_id = _upload(client, secret, 3)  # ~330 bytes
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    refused = client.post("/v1/batches", json=body, headers=bearer(secret))
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "quota_exceeded"
    assert client.get("/v1/batches", headers=bearer(secret)).get_json()["data"] == []
    assert client.get("/api/v1/jobs", headers=bearer(secret)).get_json()["jobs"] == []
    too_much = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(b"x" * 200), "c.jsonl")},
                           content_type="multipart/form-data", headers=bearer(secret))
    assert too_much.status_code == 413 and too_much.get_json()["error"]["code"] == "storage_limit_reached"
    assert client.post("/v1/batches", json={**body, "input_file_id": _upload_two(client, secret, file_id)},
                       headers=bearer(secret)).status_code == 200


def _upload_two(client, secret: str, old_file: str) -> str:
    assert client.delete(f"/v1/files/{old_file}", headers=bearer(secret)).status_code == 200
    return _upload(client, secret, 2)


def test_the_usage_page_draws_each_days_tokens_per_model_and_the_keys_limits(app):
    client = app.test_client()
    secret = _key(client, tokens_per_day=10_000, max_active_jobs=5)
    job_id = _submit(client, secret).get_json()["id"]
    _finish(app, job_id, prompt_tokens=2, generated=7)
    browser = app.test_client()
    token = csrf_token(browser.get("/login").get_data(as_text=True))
    assert browser.post("/login", data={"api_key": secret, "csrf_token": token}).status_code == 302
    page = browser.get("/usage").get_data(as_text=True)
    today = datetime.now(UTC).date().isoformat()
    assert page.count('class="bar"') == 1 and f"<title>{today} tiny-bloom: 9 tokens</title>" in page
    assert "<td>tiny-bloom</td><td>2</td><td>7</td><td>1</td>" in page
    assert "of 10000" in page and "of 5" in page


def test_stacked_bars_scale_to_a_round_top_and_stack_series_in_order():
    series = {"a": {"2026-01-01": 30, "2026-01-02": 10}, "b": {"2026-01-01": 50}}
    chart = stacked_bars(["2026-01-01", "2026-01-02"], series, width=156, height=132)
    assert chart.top == 100 and nice_top(0) == 1 and nice_top(101) == 200
    first_a, first_b, second_a = chart.bars
    plot = 132 - 24 - 8
    assert (first_a.height, first_b.height, second_a.height) == (plot * 0.3, plot * 0.5, plot * 0.1)
    assert first_b.y + first_b.height == first_a.y  # b sits on a
    assert first_a.x < second_a.x and [name for name, _ in chart.legend] == ["a", "b"]


def test_per_key_counters_reach_the_metrics_only_when_turned_on(redis_server, redis_client):
    for on in (False, True):
        redis_client.flushdb()
        settings = Settings(redis_url=redis_server.url, model="/models/tiny-bloom", operator_keys=(OPS,),
                            metrics_per_key=on)
        app = create_app(settings)
        client = app.test_client()
        made = client.post("/api/v1/keys", json={"name": "metered"}, headers=bearer(OPS)).get_json()
        job_id = _submit(client, made["secret"]).get_json()["id"]
        _finish(app, job_id, prompt_tokens=2, generated=7)
        text = client.get("/metrics", headers=bearer(OPS)).get_data(as_text=True)
        line = f'bloomq_key_tokens_total{{key="{made["owner"]}",kind="completion",model="tiny-bloom"}} 7.0'
        assert (line in text) is on
        assert (f'bloomq_key_jobs_total{{key="{made["owner"]}",model="tiny-bloom"}} 1.0' in text) is on


@pytest.mark.parametrize("stalled", [False, True])
def test_a_cancelled_batch_gives_back_what_its_lines_held_queued_or_not_yet(app, monkeypatch, stalled):
    client = app.test_client()
    secret = _key(client, max_active_jobs=4, tokens_per_day=10_000)
    owner = client.get("/api/v1/keys", headers=bearer(OPS)).get_json()["keys"][0]["owner"]
    file_id = _upload(client, secret, 3)
    if stalled:  # stored whole, its queuing never ran (a web process died): the lines are no jobs yet
        monkeypatch.setattr(BatchIntake, "run", lambda self, batch_id: 0)
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    batch = client.post("/v1/batches", json=body, headers=bearer(secret)).get_json()
    monkeypatch.undo()
    quotas = app.extensions["bloomq"].quotas
    assert quotas.in_use(owner)["active_jobs"] == 3 and quotas.in_use(owner)["tokens_today"] > 0
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=bearer(secret)).get_json()
    assert cancelled["status"] in ("cancelling", "cancelled")
    assert quotas.in_use(owner) == {"tokens_today": 0, "active_jobs": 0}

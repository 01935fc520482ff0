"""``GET /api/v1/jobs``: a key's own jobs, newest first, paged with cursors, filtered by status; and the
``bloomq jobs`` table over it. Real Redis, no worker (jobs stay queued unless a test moves them)."""

from __future__ import annotations

import time

import pytest
import requests

import cli
import jobs.listing
from config.settings import Settings
from jobs.keys import job_key, owner_jobs_key
from jobs.schema import GenerateParameters, Job, JobStatus, new_job_id, utcnow
from web import create_app

ALICE, BOB = "alice-list-key", "bob-list-key"


@pytest.fixture()
def keyed(redis_server, redis_client):
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", api_keys=(ALICE, BOB)))
    app.config["TESTING"] = True
    return app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(client, inputs: str, key: str | None = None) -> str:
    response = client.post("/api/v1/jobs", json={"inputs": inputs}, headers=bearer(key) if key else {})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def _list(client, key: str | None = None, **params) -> dict:
    response = client.get("/api/v1/jobs", query_string=params, headers=bearer(key) if key else {})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _all_pages(client, key: str | None = None, **params) -> tuple[list[str], int]:
    """Every job id the listing gives, following next_cursor, and how many pages it took."""
    ids, pages, cursor = [], 0, None
    while True:
        body = _list(client, key, **params, **({"cursor": cursor} if cursor else {}))
        ids += [job["id"] for job in body["jobs"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages


def test_a_key_lists_its_own_jobs_newest_first_in_pages(keyed):
    client = keyed.test_client()
    mine = [_submit(client, f"prompt {i}", ALICE) for i in range(7)]
    theirs = _submit(client, "not yours", BOB)
    first = _list(client, ALICE, limit=3)
    assert [job["id"] for job in first["jobs"]] == mine[::-1][:3]
    assert first["jobs"][0] == client.get(f"/api/v1/jobs/{mine[-1]}", headers=bearer(ALICE)).get_json()
    assert first["next_cursor"]
    ids, pages = _all_pages(client, ALICE, limit=3)
    assert ids == mine[::-1] and pages == 3  # 3 + 3 + 1, the last page says there is no more
    assert _list(client, BOB)["jobs"][0]["id"] == theirs and len(_list(client, BOB)["jobs"]) == 1
    # A job id works as a cursor too (OpenAI's ``after``): the page starts after it.
    assert [job["id"] for job in _list(client, ALICE, after=mine[4])["jobs"]] == mine[3::-1]
    assert [job["id"] for job in _list(client, ALICE, cursor=mine[1])["jobs"]] == [mine[0]]
    assert _list(client, ALICE, limit=7)["next_cursor"] is None  # exactly a page: no empty page after it


def test_another_keys_job_is_no_cursor_and_bad_parameters_are_named(keyed):
    client = keyed.test_client()
    _submit(client, "mine", ALICE)
    theirs = _submit(client, "theirs", BOB)
    cases = [({"after": theirs}, "after"), ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"), ({"cursor": "%%%"}, "cursor"),
             ({"status": "done"}, "status"), ({"status": "QUEUED"}, "status"), ({"limit": 0}, "limit"),
             ({"limit": 101}, "limit"), ({"limit": "many"}, "limit")]
    for params, name in cases:
        response = client.get("/api/v1/jobs", query_string=params, headers=bearer(ALICE))
        assert response.status_code == 422, params
        assert [f["name"] for f in response.get_json()["error"]["fields"]] == [name], params
    assert client.get("/api/v1/jobs").status_code == 401


def test_status_filter_keeps_only_jobs_in_that_state(keyed):
    client = keyed.test_client()
    store = keyed.extensions["bloomq"].store
    ids = [_submit(client, f"p{i}", ALICE) for i in range(5)]
    client.post(f"/api/v1/jobs/{ids[1]}/cancel", headers=bearer(ALICE))
    client.post(f"/api/v1/jobs/{ids[3]}/cancel", headers=bearer(ALICE))
    store.start(ids[4], "w")
    assert _all_pages(client, ALICE, status="canceled", limit=1)[0] == [ids[3], ids[1]]
    assert _all_pages(client, ALICE, status="queued")[0] == [ids[2], ids[0]]
    assert [j["status"] for j in _list(client, ALICE, status="running")["jobs"]] == ["running"]
    assert _list(client, ALICE, status="failed") == {"jobs": [], "next_cursor": None}


def test_a_filter_that_skips_many_jobs_pages_short_but_loses_none(keyed, monkeypatch):
    client = keyed.test_client()
    ids = [_submit(client, f"p{i}", ALICE) for i in range(12)]
    for job_id in ids[:10]:
        client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ALICE))
    monkeypatch.setattr(jobs.listing, "OWNED_SCAN_LIMIT", 4)  # each request examines at most 4 entries
    found, pages = _all_pages(client, ALICE, status="queued", limit=5)
    assert found == [ids[11], ids[10]] and pages > 1


def test_with_keys_off_the_listing_is_every_job_made_without_a_key(client, redis_client):
    ids = [_submit(client, f"p{i}") for i in range(3)]
    redis_client.zadd(owner_jobs_key("key:0123456789ab"), {new_job_id(): time.time()})  # some key's job
    assert [job["id"] for job in _list(client)["jobs"]] == ids[::-1]
    assert redis_client.zcard(owner_jobs_key(None)) == 3


def test_expired_records_are_skipped_and_dropped_from_the_index(keyed, redis_client):
    client = keyed.test_client()
    ids = [_submit(client, f"p{i}", ALICE) for i in range(6)]
    index = owner_jobs_key(keyed.extensions["bloomq"].store.get(ids[0]).owner)
    for job_id in (ids[5], ids[2], ids[1]):
        redis_client.delete(job_key(job_id))  # as if their retention ran out
    assert _all_pages(client, ALICE, limit=2)[0] == [ids[4], ids[3], ids[0]]
    assert sorted(m.decode() for m in redis_client.zrange(index, 0, -1)) == sorted([ids[0], ids[3], ids[4]])


def test_the_index_is_trimmed_to_the_retention_window_when_written(keyed, redis_client):
    client = keyed.test_client()
    first = _submit(client, "p", ALICE)
    store = keyed.extensions["bloomq"].store
    index = owner_jobs_key(store.get(first).owner)
    stale = new_job_id()
    redis_client.zadd(index, {stale: time.time() - store.retention_seconds - 60})
    second = _submit(client, "q", ALICE)
    assert {m.decode() for m in redis_client.zrange(index, 0, -1)} == {first, second}
    assert 0 < redis_client.ttl(index) <= store.retention_seconds


def test_jobs_made_in_the_same_instant_are_each_listed_once(keyed):
    store = keyed.extensions["bloomq"].store
    now = utcnow()
    made = [Job(id=new_job_id(), model="tiny-bloom", inputs="hi", parameters=GenerateParameters(max_new_tokens=1),
                owner="key:abcdefabcdef", created_at=now) for _ in range(5)]
    for job in made:
        store.create(job)
    seen, position = [], None
    while True:
        page, position = store.list_owned("key:abcdefabcdef", 2, position)
        seen += [job.id for job in page]
        if position is None:
            break
    assert sorted(seen) == sorted(job.id for job in made) and len(seen) == 5
    assert seen == sorted(seen, reverse=True)  # ties come in reverse id order, as Redis orders them
    queued, _ = store.list_owned("key:abcdefabcdef", 10, status=JobStatus.QUEUED)
    assert len(queued) == 5


def test_cli_jobs_prints_the_keys_jobs_as_a_table(keyed, monkeypatch, capsys):
    client = keyed.test_client()
    ids = [_submit(client, f"Once upon a time, number {i}, there was a very long prompt indeed", ALICE)
           for i in range(3)]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=bearer(ALICE))
    base = "http://bloomq.test"

    def request(session, method, url, params=None, timeout=None, **kwargs):  # the CLI's HTTP, served by the app
        answer = client.open(url.removeprefix(base), method=method, query_string=params,
                             headers=dict(session.headers))
        response = requests.Response()
        response.status_code, response._content = answer.status_code, answer.data
        response.headers.update(answer.headers)
        return response

    monkeypatch.setattr(requests.Session, "request", request)
    assert cli.main(["--url", base, "--api-key", ALICE, "jobs", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "MODEL", "CREATED", "INPUTS"]
    assert [line.split()[:3] for line in lines[1:]] == [[ids[2], "queued", "tiny-bloom"],
                                                        [ids[1], "queued", "tiny-bloom"]]
    assert lines[1].endswith("Once upon a time, number 2, there was a…")
    assert cli.main(["--url", base, "--api-key", ALICE, "jobs", "--status", "canceled"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [[ids[0], "canceled"]]
    assert cli.main(["--url", base, "--api-key", BOB, "jobs"]) == 0
    assert capsys.readouterr().out.strip() == "no jobs"

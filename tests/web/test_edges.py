"""Promises at the edges (real Redis, no worker): a refused request leaves nothing behind, a batch is
queued whole or not at all, a cancel always wins, limits hold on every route that creates work."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import replace

import pytest

from config.settings import Settings
from jobs.intake import BatchIntake
from jobs.store import JobStore
from jobs.workers import WorkerDirectory
from tests.support import csrf_token
from web import create_app
from worker.recovery import OrphanRecovery

MODEL = "bloom-560m"


def _settings(redis_server, **overrides) -> Settings:
    return replace(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", extra_models=(MODEL,)), **overrides)


def _client(redis_server, **overrides):
    app = create_app(_settings(redis_server, **overrides))
    app.config["TESTING"] = True
    return app.test_client()


def _line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "hi", "max_tokens": 3, **body}}


def _upload(client, content: bytes):
    return client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "b.jsonl")},
                       content_type="multipart/form-data")


def _jsonl(lines: list[dict], sep: str = "\n") -> bytes:
    return "".join(json.dumps(line) + sep for line in lines).encode()


def _create(client, file_id: str):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                            "completion_window": "24h"})


def _nothing_queued(redis_client) -> bool:
    return (redis_client.keys("bloomq:job:*") == [] and redis_client.keys("bloomq:batch-queue:*") == []
            and redis_client.llen(f"bloomq.{MODEL}") == 0)


def test_a_file_with_one_bad_line_is_refused_whole_naming_every_bad_line(redis_server, redis_client):
    client = _client(redis_server)
    lines = [_line(f"r{i}") for i in range(4)] + [_line("r4", top_k=0), _line("r5", max_tokens=10**6)]
    file_id = _upload(client, _jsonl(lines)).get_json()["id"]
    response = _create(client, file_id)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_batch_file"
    bad = {(e["line"], e["param"]) for e in error["errors"]["data"]}
    # top_k is refused by the job schema, max_tokens by the model's length limit: the checks jobs meet.
    assert bad == {(5, "body.top_k"), (6, "body.max_tokens")}
    assert _nothing_queued(redis_client)
    assert client.get("/v1/batches").get_json()["data"] == []


def test_lines_are_counted_as_they_are_read_whatever_ends_them(redis_server, redis_client):
    client = _client(redis_server, max_batch_lines=50)
    for sep in ("\r", "\r\n", "\n"):
        response = _upload(client, _jsonl([_line(f"r{i}") for i in range(120)], sep))
        assert response.status_code == 400, sep
        assert "120 lines" in response.get_json()["error"]["message"]
    assert _upload(client, _jsonl([_line(f"r{i}") for i in range(50)], "\r")).status_code == 200
    assert redis_client.zcard("bloomq:files:-") == 1


def _form_batch(client, kind: str, content: bytes):
    token = csrf_token(client.get("/batches").get_data(as_text=True))
    return client.post("/batches", data={"kind": kind, "csrf_token": token, "file": (io.BytesIO(content), "b.jsonl")},
                       content_type="multipart/form-data")


def test_the_forms_batch_upload_meets_the_same_limits(redis_server, redis_client):
    client = _client(redis_server, max_batch_lines=50, max_batch_file_bytes=64 * 1024)
    page = _form_batch(client, "jsonl", _jsonl([_line(f"r{i}") for i in range(60)], "\r"))
    assert page.status_code == 422 and "60 lines" in page.get_data(as_text=True)
    big = _form_batch(client, "prompts", b"x" * 70_000)
    assert big.status_code == 422 and "bytes" in big.get_data(as_text=True)
    bad = _form_batch(client, "jsonl", _jsonl([_line("a", top_k=0)]))
    assert bad.status_code == 422 and "line 1" in bad.get_data(as_text=True)
    assert _nothing_queued(redis_client)


def test_metadata_and_custom_ids_are_bounded(redis_server, redis_client):
    client = _client(redis_server)
    file_id = _upload(client, _jsonl([_line("x" * 513)])).get_json()["id"]
    assert _create(client, file_id).get_json()["error"]["errors"]["data"][0]["param"] == "custom_id"
    good = _upload(client, _jsonl([_line("a")])).get_json()["id"]
    too_many = client.post("/v1/batches", json={"input_file_id": good, "endpoint": "/v1/completions",
                                                "completion_window": "24h", "metadata": {f"k{i}": "v" for i in range(17)}})
    assert too_many.status_code == 400 and too_many.get_json()["error"]["param"] == "metadata"
    assert _nothing_queued(redis_client)


def test_a_bad_batch_request_is_a_400_or_404_naming_the_field_never_a_500(redis_server, redis_client):
    client = _client(redis_server)
    nested = client.post("/v1/batches", data="[" * 5000 + "]" * 5000, content_type="application/json")
    assert nested.status_code == 400 and nested.get_json()["error"]["param"] == "body"
    assert "nested" in nested.get_json()["error"]["message"]
    # A result file id of no batch is an unknown file, named by the field that carried it.
    for file_id in ("file-batch_nothing-output", "file--errors"):
        found = client.get(f"/v1/files/{file_id}")
        assert found.status_code == 404 and found.get_json()["error"]["param"] == "file_id"
        assert file_id in found.get_json()["error"]["message"]
        made = _create(client, file_id)
        assert made.status_code == 404 and made.get_json()["error"]["param"] == "input_file_id"
    assert _create(client, "file-never-uploaded").get_json()["error"]["param"] == "input_file_id"
    assert _nothing_queued(redis_client)


def _stalled_batch(client, monkeypatch, lines: int) -> dict:
    """A batch stored whole whose queuing never ran (its web process died, or is slow)."""
    monkeypatch.setattr(BatchIntake, "run", lambda self, batch_id: 0)
    file_id = _upload(client, _jsonl([_line(f"r{i}", n=2) for i in range(lines)])).get_json()["id"]
    batch = _create(client, file_id).get_json()
    monkeypatch.undo()
    return batch


def test_a_cancel_before_the_lines_are_queued_wins_and_nothing_runs(redis_server, redis_client, monkeypatch):
    client = _client(redis_server)
    batch = _stalled_batch(client, monkeypatch, 5)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 10
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel").get_json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"] == {"total": 10, "completed": 0, "failed": 10}
    assert _nothing_queued(redis_client)
    errors = client.get(f"/v1/files/{cancelled['error_file_id']}/content").get_data(as_text=True).splitlines()
    assert [json.loads(row)["error"]["code"] for row in errors] == ["batch_cancelled"] * 5
    # A late intake (the slow process waking up) queues nothing, and a second cancel changes nothing.
    store = client.application.extensions["bloomq"]
    assert BatchIntake(store.store, client.application.extensions["bloomq.batches"], store.batch_queue).run(batch["id"]) == 0
    assert client.post(f"/v1/batches/{batch['id']}/cancel").get_json()["status"] == "cancelled"
    assert _nothing_queued(redis_client)


def test_a_batch_left_half_queued_is_finished_by_the_workers_recovery_each_job_once(redis_server, redis_client,
                                                                                    monkeypatch):
    client = _client(redis_server)
    monkeypatch.setattr("jobs.intake.CHUNK", 7)
    batch = _stalled_batch(client, monkeypatch, 150)
    assert redis_client.keys("bloomq:job:*") == []
    store = JobStore(redis_client, 3600)
    reapers = [OrphanRecovery(store, WorkerDirectory(redis_client), lambda job: None, interval=1,
                              instance=f"w:{i}", trust_after=0, intake_stall_seconds=0) for i in range(3)]
    threads = [threading.Thread(target=reaper._recover) for reaper in reapers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(redis_client.keys("bloomq:job:*")) == 300
    queued = redis_client.lrange(f"bloomq:batch-queue:{MODEL}:-", 0, -1)
    assert len(queued) == 300 and len(set(queued)) == 300
    assert redis_client.zcard("bloomq:batch-intakes") == 0
    assert client.get(f"/v1/batches/{batch['id']}").get_json()["status"] == "in_progress"


def test_the_batch_list_skips_batches_gone_past_retention(redis_server, redis_client):
    client = _client(redis_server)
    ids = []
    for i in range(3):
        file_id = _upload(client, _jsonl([_line(f"r{i}")])).get_json()["id"]
        ids.append(_create(client, file_id).get_json()["id"])
    redis_client.delete(f"bloomq:batch:{ids[1]}")  # as Redis expires it at the end of its retention
    listed = client.get("/v1/batches?limit=1").get_json()
    assert [b["id"] for b in listed["data"]] == [ids[2]] and listed["has_more"]
    rest = client.get(f"/v1/batches?limit=5&after={ids[2]}").get_json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    page = client.get("/batches")
    assert page.status_code == 200 and ids[0] in page.get_data(as_text=True)


def test_files_are_listed_per_key_with_paging_and_a_cap_on_stored_bytes(redis_server, redis_client):
    content = _jsonl([_line("a")])
    client = _client(redis_server, api_keys=("ka", "kb"), max_file_bytes_per_key=2 * len(content))
    a, b = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
    first = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "1.jsonl")},
                        headers=a, content_type="multipart/form-data").get_json()["id"]
    second = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "2.jsonl")},
                         headers=a, content_type="multipart/form-data").get_json()["id"]
    third = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "3.jsonl")},
                        headers=a, content_type="multipart/form-data")
    assert third.status_code == 413 and third.get_json()["error"]["code"] == "storage_limit_reached"
    listed = client.get("/v1/files?limit=1", headers=a).get_json()
    assert [f["id"] for f in listed["data"]] == [second] and listed["has_more"]
    assert [f["id"] for f in client.get(f"/v1/files?after={second}", headers=a).get_json()["data"]] == [first]
    assert client.get("/v1/files", headers=b).get_json()["data"] == []  # another key's files are not listed
    client.delete(f"/v1/files/{first}", headers=a)
    again = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "3.jsonl")},
                        headers=a, content_type="multipart/form-data")
    assert again.status_code == 200


def _stream_completion(client, n: int = 1, headers=None):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": n,
                                                 "temperature": 1, "stream": True}, headers=headers or {})


CREATING_ROUTES = {
    "job API": lambda c: c.post("/api/v1/jobs", json={"inputs": "hi", "model": MODEL}),
    "completions": lambda c: _stream_completion(c),
    "TGI hosted": lambda c: c.post(f"/models/{MODEL}", json={"inputs": "hi", "stream": True}),
    "TGI generate_stream": lambda c: c.post(f"/models/{MODEL}/generate_stream", json={"inputs": "hi"}),
    "files": lambda c: _upload(c, _jsonl([_line("a")])),
    "form": lambda c: c.post("/", data={"inputs": "hi", "model": MODEL,
                                        "csrf_token": csrf_token(c.get("/").get_data(as_text=True))}),
}


@pytest.mark.parametrize("route", sorted(CREATING_ROUTES))
def test_the_rate_limit_counts_on_every_route_that_creates_work(redis_server, redis_client, route):
    client = _client(redis_server, rate_limit="3/minute")
    codes = []
    for _ in range(4):
        response = CREATING_ROUTES[route](client)
        codes.append(response.status_code)
        response.close()
    assert codes[:3] != [429] * 3 and all(code < 400 for code in codes[:3]), codes
    assert codes[3] == 429, codes
    made = len(redis_client.keys("bloomq:job:*"))
    assert made == (0 if route == "files" else 3)  # the refused request made nothing


def test_the_rate_limit_counts_jobs_and_refuses_a_request_that_does_not_fit_whole(redis_server, redis_client):
    client = _client(redis_server, rate_limit="3/minute")
    assert _stream_completion(client, n=2).status_code == 200
    refused = _stream_completion(client, n=2)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert len(redis_client.keys("bloomq:job:*")) == 2
    assert _stream_completion(client, n=1).status_code == 200  # the refused one counted nothing
    file_id = _upload(client, _jsonl([_line(f"r{i}") for i in range(4)])).get_json()
    assert file_id["error"]["type"] == "rate_limit_error"  # the upload counted too: the window is full


def test_a_batch_counts_one_per_job_against_the_rate_limit(redis_server, redis_client):
    client = _client(redis_server, rate_limit="5/minute")
    file_id = _upload(client, _jsonl([_line(f"r{i}", n=2) for i in range(3)])).get_json()["id"]
    refused = _create(client, file_id)  # 6 jobs, one upload already counted: no room
    assert refused.status_code == 429 and _nothing_queued(redis_client)


def test_n_choices_are_queued_all_or_none(redis_server, redis_client):
    client = _client(redis_server, max_queue=1)
    refused = _stream_completion(client, n=2)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "queue_full"
    tgi = client.post(f"/models/{MODEL}/generate", json={"inputs": "hi", "parameters": {"best_of": 2,
                                                                                         "do_sample": True}})
    assert tgi.status_code == 429
    assert _nothing_queued(redis_client)
    assert _stream_completion(client, n=1).status_code == 200
    assert redis_client.llen(f"bloomq.{MODEL}") == 1


def test_a_client_at_its_watcher_cap_is_refused_before_any_job_is_made(redis_server, redis_client):
    client = _client(redis_server, max_watchers_per_key=1)
    holding = _stream_completion(client)  # its stream holds the one slot until it is closed
    assert holding.status_code == 200 and len(redis_client.keys("bloomq:job:*")) == 1
    refused = _stream_completion(client, n=3)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_watchers"
    assert len(redis_client.keys("bloomq:job:*")) == 1
    holding.close()
    assert _stream_completion(client).status_code == 200


def test_a_submission_the_replicas_did_not_acknowledge_leaves_no_message(redis_server, redis_client):
    client = _client(redis_server, redis_min_replicas=1, redis_replica_wait_seconds=0.1)
    refused = _stream_completion(client, n=3)
    assert refused.status_code == 503
    assert _nothing_queued(redis_client) and redis_client.keys("bloomq:queued:*") == []

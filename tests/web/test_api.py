"""The REST API against a real Redis, with no worker running (jobs stay queued)."""

import json
import uuid

import pytest

from config.settings import Settings
from tests.support import wait_for
from web import create_app


def _submit(client, body, **kwargs):
    return client.post("/api/v1/jobs", json=body, **kwargs)


def test_submit_returns_202_location_and_the_job_resource(client, redis_client):
    response = _submit(client, {"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 202
    body = response.get_json()
    assert response.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert uuid.UUID(body["id"]).version == 4
    assert body["status"] == "queued"
    assert body["model"] == "tiny-bloom"
    assert body["parameters"]["max_new_tokens"] == 5 and body["parameters"]["do_sample"] is False
    assert body["output"] is None and body["error"] is None and body["worker"] is None
    assert body["urls"] == {"self": f"/api/v1/jobs/{body['id']}", "page": f"/jobs/{body['id']}"}
    assert body["created_at"].endswith("Z") and body["started_at"] is None
    # The message went to the model's own queue, carrying only the id.
    message = json.loads(redis_client.lindex("bloomq.tiny-bloom", 0))
    assert message["headers"]["task"] == "bloomq.generate"
    assert body["id"] in message["headers"]["argsrepr"]


def test_poll_returns_the_same_job(client):
    job = _submit(client, {"inputs": "Hello"}).get_json()
    warnings = job.pop("warnings")
    assert "no worker" in warnings[0]  # accepted and queued, and the client is told why it may wait
    polled = client.get(f"/api/v1/jobs/{job['id']}")
    assert polled.status_code == 200
    assert polled.get_json() == job
    assert job["parameters"]["max_new_tokens"] == 64  # the default


def test_tutorial_parameters_are_accepted(client):
    params = {"max_length": 200, "top_k": 1, "temperature": 0, "repetition_penalty": 2.0, "seed": 2024}
    response = _submit(client, {"inputs": "Hello", "parameters": params})
    assert response.status_code == 202
    assert response.get_json()["parameters"]["do_sample"] is False


def test_a_job_can_name_another_known_model(client, redis_client):
    response = _submit(client, {"inputs": "Hello", "model": "bloom-1b7"})
    assert response.status_code == 202
    assert response.get_json()["model"] == "bloom-1b7"
    assert redis_client.llen("bloomq.bloom-1b7") == 1


# Fixed ids: every test process (pytest-xdist) must collect the same test names.
@pytest.mark.parametrize("job_id", ["8d3f5a7e-2b1c-4e6f-9a0d-3c5b7e9f1a2d", "not-a-uuid"],
                         ids=["unknown-uuid", "not-a-uuid"])
def test_unknown_job_is_a_json_404(client, job_id):
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "not_found"


def test_expired_job_is_a_404(client, redis_client):
    job = _submit(client, {"inputs": "Hello"}).get_json()
    redis_client.delete(f"bloomq:job:{job['id']}")
    assert client.get(f"/api/v1/jobs/{job['id']}").status_code == 404


def test_malformed_json_is_a_400(client):
    response = client.post("/api/v1/jobs", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "bad_request"


def test_non_object_body_is_a_400(client):
    response = client.post("/api/v1/jobs", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400
    assert "object" in response.get_json()["error"]["message"]


def test_wrong_content_type_is_a_415(client):
    response = client.post("/api/v1/jobs", data="inputs=hi", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.is_json


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"parameters": {}}, "inputs"),
        ({"inputs": ""}, "inputs"),
        ({"inputs": "hi", "parameters": {"top_p": 2}}, "parameters.top_p"),
        ({"inputs": "hi", "parameters": {"temperature": -1}}, "parameters.temperature"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 100000}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_length": 100000}}, "parameters.max_length"),
        ({"inputs": "hi", "parameters": {"num_beams": 4}}, "parameters.num_beams"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 4, "min_new_tokens": 5}}, "parameters.min_new_tokens"),
        ({"inputs": "hi", "parameters": {"min_new_tokens": -1}}, "parameters.min_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_length": 3, "min_new_tokens": 5}}, "parameters.min_new_tokens"),
        ({"inputs": "hi", "model": "gpt2"}, "model"),
        ({"inputs": "hi", "extra": 1}, "extra"),
    ],
)
def test_invalid_fields_are_a_422_naming_the_field(client, redis_client, body, field):
    response = _submit(client, body)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "validation_error"
    assert field in [f["name"] for f in error["fields"]]
    assert redis_client.keys("bloomq:job:*") == []  # nothing half-written


def test_unknown_route_and_wrong_method_are_json(client):
    assert client.get("/api/v1/nope").get_json()["error"]["type"] == "not_found"
    response = client.delete("/api/v1/jobs")
    assert response.status_code == 405 and response.is_json


def test_models_lists_configured_models_with_depth_and_workers(client):
    _submit(client, {"inputs": "a"})
    _submit(client, {"inputs": "b"})
    models = {m["name"]: m for m in client.get("/api/v1/models").get_json()["models"]}
    assert set(models) == {"tiny-bloom", "bloom-1b7"}
    assert models["tiny-bloom"]["default"] is True
    assert models["tiny-bloom"]["queue_depth"] == 2
    assert models["tiny-bloom"]["workers"] == 0


def test_the_web_is_ready_without_workers_and_a_job_submitted_then_waits_in_the_queue(client, app, redis_client):
    # The front of a queue stays in service while the back is away (workers restarting, loading, scaled away).
    from jobs.workers import WorkerInfo

    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "reasons": [], "models_without_workers": ["tiny-bloom",
                                                                                                 "bloom-1b7"]}
    job = _submit(client, {"inputs": "a"})
    assert job.status_code == 202 and job.get_json()["status"] == "queued"
    assert redis_client.llen("bloomq.tiny-bloom") == 1
    directory = app.extensions["bloomq"].directory
    info = WorkerInfo(name="tiny-bloom@h.cpu", instance="tiny-bloom@h.cpu:1:0", model="tiny-bloom", host="h",
                      device="cpu", dtype="float32", pid=1)
    directory.announce(info, ttl_seconds=30)
    from tests.support import wait_for

    wait_for(lambda: client.get("/readyz").get_json()["models_without_workers"] == ["bloom-1b7"], timeout=5,
             what="the live worker to be seen")


def test_readiness_is_503_json_when_redis_is_down(redis_server, capsys):
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", model="/models/tiny-bloom"))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    # A reason code and a fixed message for whoever asks; the exception (addresses, ports) only in the log.
    assert response.get_json() == {"status": "unavailable", "reasons": [
        {"code": "redis_unavailable", "message": "the job store does not answer"}]}
    assert "127.0.0.1:1" not in response.get_data(as_text=True)
    logged = [line for line in capsys.readouterr().err.splitlines() if "does not answer" in line]
    assert logged and "Connection refused" in logged[0]
    submit = _submit(client, {"inputs": "hi"})
    assert submit.status_code == 503 and submit.get_json()["error"]["type"] == "unavailable"


def test_multilingual_text_is_stored_and_returned_intact(client):
    prompt = "Grüße, 你好世界, مرحبا بالعالم, नमस्ते, print('hi')"
    job = _submit(client, {"inputs": prompt}).get_json()
    raw = client.get(f"/api/v1/jobs/{job['id']}").get_data(as_text=True)
    assert prompt in raw  # readable UTF-8, not \\u escapes
    assert json.loads(raw)["inputs"] == prompt


def test_long_poll_returns_as_soon_as_the_job_is_final(client, app, redis_client, monkeypatch):
    import threading
    import time

    from jobs import events
    from jobs.keys import job_events_channel
    from jobs.schema import JobOutput

    # Re-reads far apart: only the change's notice can end the wait early.
    monkeypatch.setattr(events, "WAIT_RECHECK_SECONDS", 30.0)
    job = _submit(client, {"inputs": "Hello"}).get_json()
    store = app.extensions["bloomq"].store
    channel = job_events_channel(job["id"])

    def finish_once_waited_on():
        wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] == 1, timeout=10, what="the long poll")
        store.start(job["id"], "w")
        store.succeed(job["id"], JobOutput(generated_text="hi", generated_tokens=1, finish_reason="length"), 0.1)

    finisher = threading.Thread(target=finish_once_waited_on)
    finisher.start()
    started = time.monotonic()
    body = client.get(f"/api/v1/jobs/{job['id']}?wait=60").get_json()
    elapsed = time.monotonic() - started
    finisher.join()
    assert body["status"] == "succeeded"
    assert elapsed < 15  # woken by the notice, not by a re-read (30 s) or the end of the wait (60 s)


def test_long_poll_gives_up_after_the_wait(client):
    import time

    job = _submit(client, {"inputs": "Hello"}).get_json()
    started = time.monotonic()
    body = client.get(f"/api/v1/jobs/{job['id']}?wait=0.5").get_json()
    assert body["status"] == "queued" and time.monotonic() - started >= 0.45


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_bad_wait_is_a_422_naming_it(client, wait):
    job = _submit(client, {"inputs": "Hello"}).get_json()
    response = client.get(f"/api/v1/jobs/{job['id']}?wait={wait}")
    assert response.status_code == 422 and response.get_json()["error"]["fields"][0]["name"] == "wait"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"inputs": "a", "parameters": {"temperature": Infinity}}', "parameters.temperature"),
        ('{"inputs": "a", "parameters": {"top_p": NaN}}', "parameters.top_p"),
        ('{"inputs": "a", "parameters": {"repetition_penalty": -Infinity}}', "parameters.repetition_penalty"),
        ('{"inputs": "a", "timeout": NaN}', "timeout"),
        ('{"inputs": "a", "parameters": {"temperature": 0.00001}}', "parameters.temperature"),
        ('{"inputs": "a", "parameters": {"top_k": 9223372036854775807}}', "parameters.top_k"),
    ],
)
def test_non_finite_and_out_of_bounds_numbers_are_refused_never_stored(client, redis_client, raw, field):
    response = client.post("/api/v1/jobs", data=raw, content_type="application/json")
    assert response.status_code == 422
    assert field in [f["name"] for f in response.get_json()["error"]["fields"]]
    assert redis_client.llen("bloomq.tiny-bloom") == 0  # nothing queued


def test_temperature_zero_is_still_greedy_and_the_bounds_themselves_are_accepted(client):
    body = {"inputs": "a", "parameters": {"temperature": 0, "top_k": 250880, "top_p": 1e-6,
                                          "repetition_penalty": 100}}
    response = _submit(client, body)
    assert response.status_code == 202
    assert response.get_json()["parameters"]["do_sample"] is False


def test_a_body_nested_thousands_deep_is_a_400_not_a_500(client):
    raw = '{"inputs": "a", "parameters": ' + "[" * 5000 + "]" * 5000 + "}"
    response = client.post("/api/v1/jobs", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "nested" in response.get_json()["error"]["message"]


def test_a_model_announced_only_by_a_live_worker_is_listed_and_accepted(client, redis_client):
    from jobs.workers import WorkerDirectory, WorkerInfo

    info = WorkerInfo(name="newcomer@gpu-9.gpu0", instance="newcomer@gpu-9.gpu0:1", model="newcomer",
                      source="/data/newcomer", max_input_tokens=100, max_total_tokens=300, host="gpu-9",
                      device="cuda:0", dtype="bfloat16", pid=1)
    WorkerDirectory(redis_client).announce(info, ttl_seconds=30)
    models = {m["name"]: m for m in client.get("/api/v1/models").get_json()["models"]}
    assert models["newcomer"]["workers"] == 1 and models["newcomer"]["max_total_tokens"] == 300
    accepted = _submit(client, {"inputs": "hi", "model": "newcomer", "parameters": {"max_new_tokens": 5}})
    assert accepted.status_code == 202 and accepted.get_json()["model"] == "newcomer"
    over = _submit(client, {"inputs": "hi", "model": "newcomer", "parameters": {"max_new_tokens": 300}})
    assert over.status_code == 422  # the announced limits apply
    assert _submit(client, {"inputs": "hi", "model": "nobody-serves-this"}).status_code == 422

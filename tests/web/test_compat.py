"""The compatible APIs' request handling with no worker (errors, routing, models), the text relay across
restarts, and chat templates."""

from __future__ import annotations

import pytest

from config.settings import Settings
from web import create_app
from web.http.relay import JobEvent, TextRelay
from web.services.chat import ChatTemplateError, render_chat


@pytest.fixture()
def client(redis_server, redis_client):
    app = create_app(Settings(redis_url=redis_server.url, model="/data/bloom-560m"))
    app.config["TESTING"] = True
    return app.test_client()


def test_a_model_is_found_by_short_name_or_full_reference_and_errors_take_tgis_shape(client):
    for url in ("/models/bloom-560m/generate", "/models/bigscience/bloom-560m/generate"):
        response = client.post(url, json={"inputs": "hi", "parameters": {"temperature": -1}})
        assert response.status_code == 422
        assert response.get_json()["error_type"] == "validation"
        assert "temperature" in response.get_json()["error"]
    missing = client.post("/models/nobody/generate", json={"inputs": "hi"})
    assert missing.status_code == 404 and missing.get_json()["error_type"] == "not_found"
    refused = client.post("/models/bloom-560m", json={"inputs": "hi", "parameters": {"watermark": True}})
    assert refused.status_code == 422 and "watermark" in refused.get_json()["error"]


def test_a_preset_nobody_serves_is_refused_at_once_by_the_compatible_apis_and_taken_once_a_worker_serves_it(
    client, redis_client
):
    """A synchronous client naming a model neither configured nor served would only wait until its time ran
    out: 404 naming the model instead (the job API still queues it, with a warning)."""
    from jobs.workers import WorkerInfo

    body = {"model": "bloom-1b7", "prompt": "hi", "max_tokens": 3}
    refused = client.post("/v1/completions", json=body)
    assert refused.status_code == 404 and refused.get_json()["error"]["code"] == "model_not_found"
    assert refused.get_json()["error"]["param"] == "model"
    chat = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404
    assert client.post("/models/bigscience/bloom-1b7", json={"inputs": "hi"}).status_code == 404
    assert redis_client.llen("bloomq.bloom-1b7") == 0
    queued = client.post("/api/v1/jobs", json={"inputs": "hi", "model": "bloom-1b7"})
    assert queued.status_code == 202 and "no worker" in queued.get_json()["warnings"][0]
    client.application.extensions["bloomq"].directory.announce(WorkerInfo(
        name="bloom-1b7@box.gpu0", instance="bloom-1b7@box.gpu0:7", model="bloom-1b7", host="box", device="cuda:0",
        devices=["0"], dtype="bfloat16", pid=7, batch_capacity=8), ttl_seconds=30)
    from tests.support import wait_for

    wait_for(lambda: client.get("/v1/models/bloom-1b7").status_code == 200, timeout=5,
             what="the live worker to be seen (looked up at most once a second)")
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    assert _queued_job_params(client, redis_client, "/models/bigscience/bloom-1b7", body)["max_new_tokens"] == 3


def test_tgi_ignores_unknown_parameters_but_checks_known_ones(client, redis_client):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "some_future_knob": 1, "top_n_tokens": 9}}
    response = client.post("/models/bloom-560m/generate", json=body)
    assert response.status_code == 422 and "top_n_tokens" in response.get_json()["error"]
    assert redis_client.llen("bloomq.bloom-560m") == 0


def _queued_job_params(client, redis_client, path: str, body: dict) -> dict:
    """Post ``body`` to a TGI route (no worker: its job waits), read the parameters of the job it queued,
    then cancel that job so the request ends."""
    import threading

    from tests.support import wait_for

    app = client.application
    store = app.extensions["bloomq"].store
    before = set(redis_client.scan_iter("bloomq:job:*"))
    answered = threading.Event()

    def post() -> None:
        with app.test_client().post(path, json=body) as response:
            response.get_data()
        answered.set()

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    (key,) = wait_for(lambda: set(redis_client.scan_iter("bloomq:job:*")) - before, timeout=10, what="the job")
    job = store.get(key.decode().removeprefix("bloomq:job:"))
    store.cancel(job.id)
    assert answered.wait(10), "the request did not end when its job was canceled"
    return job.parameters.model_dump()


@pytest.mark.parametrize("path", ["/models/bloom-560m", "/models/bloom-560m/generate",
                                  "/models/bloom-560m/generate_stream"])
def test_every_tgi_route_returns_only_the_new_text_unless_asked(client, redis_client, path):
    # TGI's default, "/" (the hosted API's route, where InferenceClient(base_url=...) posts) included.
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    assert _queued_job_params(client, redis_client, path, body)["return_full_text"] is False
    body["parameters"]["return_full_text"] = True
    assert _queued_job_params(client, redis_client, path, body)["return_full_text"] is True


def test_forced_lengths_reach_the_job_from_every_surface(client, redis_client):
    # vLLM's min_tokens and ignore_eos on /v1, transformers' min_new_tokens on TGI's routes.
    tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 8, "min_new_tokens": 8}}
    assert _queued_job_params(client, redis_client, "/models/bloom-560m/generate", tgi)["min_new_tokens"] == 8
    body = {"model": "bloom-560m", "prompt": "hi", "max_tokens": 8, "min_tokens": 8, "ignore_eos": True}
    params = _queued_job_params(client, redis_client, "/v1/completions", body)
    assert (params["max_new_tokens"], params["min_new_tokens"], params["ignore_eos"]) == (8, 8, True)
    refused = client.post("/models/bloom-560m/generate", json={"inputs": "hi", "parameters": {
        "max_new_tokens": 2, "min_new_tokens": 3}})
    assert refused.status_code == 422 and "min_new_tokens" in refused.get_json()["error"]


def test_openai_errors_have_openais_shape_and_name_the_parameter(client):
    cases = [
        ({"model": "bloom-560m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "bloom-560m", "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": "bloom-560m", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ({"model": "bloom-560m", "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
        ({"model": "bloom-560m", "prompt": "x", "stop": list("abcde")}, 400, "stop"),
        ({"model": "bloom-560m", "prompt": "x", "n": 9}, 400, "n"),
        ({"model": "bloom-560m", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
        ({"model": "bloom-560m", "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
        ({"model": "bloom-560m", "prompt": ""}, 400, "prompt"),
        ({"model": "nobody", "prompt": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        response = client.post("/v1/completions", json=body)
        error = response.get_json()["error"]
        assert response.status_code == status, body
        assert error["param"] == param and error["message"] and error["type"], body


def test_an_idempotency_key_is_checked_as_on_the_job_api(client, redis_client):
    for key in ("", "k" * 256):
        response = client.post("/v1/completions", json={"model": "bloom-560m", "prompt": "x"},
                               headers={"Idempotency-Key": key})
        assert response.status_code == 400 and response.get_json()["error"]["param"] == "Idempotency-Key"
    assert redis_client.keys("bloomq:job:*") == []


def test_a_wait_or_stream_ends_after_the_compat_wait_and_the_job_goes_on(redis_server, redis_client):
    assert Settings(max_job_seconds=100).compat_wait_limit == 160  # by default: a job's longest run, and a minute
    settings = Settings.from_env({"BLOOMQ_REDIS_URL": redis_server.url, "BLOOMQ_MODEL": "/data/bloom-560m",
                                  "BLOOMQ_COMPAT_WAIT_SECONDS": "0.3"})
    assert settings.compat_wait_limit == 0.3
    app = create_app(settings)
    client = app.test_client()
    store = app.extensions["bloomq"].store
    body = {"model": "bloom-560m", "prompt": "hi"}
    waited = client.post("/v1/completions", json=body)
    assert waited.status_code == 504 and waited.get_json()["error"]["code"] == "timeout"
    tgi = client.post("/models/bloom-560m/generate", json={"inputs": "hi"})
    assert tgi.status_code == 504 and tgi.get_json()["error_type"] == "timeout"
    streamed = client.post("/v1/completions", json={**body, "stream": True}).get_data(as_text=True)
    assert "did not finish in time" in streamed and streamed.endswith("data: [DONE]\n\n")
    tgi_streamed = client.post("/models/bloom-560m/generate_stream", json={"inputs": "hi"}).get_data(as_text=True)
    assert '"error_type": "generation"' in tgi_streamed and "did not finish in time" in tgi_streamed
    job_ids = [key.decode().removeprefix("bloomq:job:") for key in redis_client.keys("bloomq:job:*")]
    assert len(job_ids) == 4 and all(store.get(job_id).status.value == "queued" for job_id in job_ids)


def test_chat_on_a_model_without_a_template_points_to_completions(client):
    response = client.post("/v1/chat/completions",
                           json={"model": "bloom-560m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "/v1/completions" in response.get_json()["error"]["message"]


def test_models_list_in_openais_shape(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    assert {"id": "bloom-560m", "object": "model", "owned_by": "bloomq", "max_model_len": 2048}.items() <= \
        body["data"][0].items()


def _event(name: str, **data) -> JobEvent:
    return JobEvent(0, name, data)


def test_the_relay_does_not_resend_text_after_a_restart_and_notices_divergence():
    relay = TextRelay()
    assert relay.feed(_event("status", status="running", attempt=1)) == ""
    assert relay.feed(_event("token", text="Hello", attempt=1)) == "Hello"
    assert relay.feed(_event("restart", attempt=1)) == ""
    assert relay.feed(_event("token", text="Hel", attempt=1)) == ""  # the client has it already
    assert relay.feed(_event("token", text="lo there", attempt=1)) == " there"
    assert relay.feed(_event("status", status="running", attempt=2)) == ""  # another worker starts over
    assert relay.feed(_event("token", text="Hello there!", attempt=2)) == "!"
    assert relay.feed(_event("token", text="late", attempt=1)) == ""  # the replaced attempt is ignored
    assert relay.finish("Hello there!!") == "!" and not relay.diverged
    relay.feed(_event("restart", attempt=2))
    relay.feed(_event("token", text="Goodbye", attempt=2))
    assert relay.diverged


def test_chat_templates_render_in_a_sandbox():
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ bos_token }}"
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == "<user>hi<s>"
    with pytest.raises(ChatTemplateError, match="no system"):
        render_chat("{{ raise_exception('no system messages') }}", [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


def test_the_openapi_document_covers_the_compatible_routes(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/models/{name}",
                 "/models/{name}/generate", "/models/{name}/generate_stream", "/models/{name}/info",
                 "/models/{name}/health", "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content",
                 "/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"):
        assert path in doc["paths"], path
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "inputs" in doc["components"]["schemas"]["TgiRequest"]["properties"]


def test_lines_left_at_the_end_of_the_window_expire_the_batch(client, redis_client):
    import io
    import json
    from datetime import timedelta

    from jobs.schema import utcnow
    from web.services.batches import batch_store

    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "bloom-560m", "prompt": "hi", "max_tokens": 3}} for i in range(2)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "b.jsonl")},
                         content_type="multipart/form-data").get_json()
    batch = client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).get_json()
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 2
    store = client.application.extensions["bloomq"].store
    with client.application.app_context():
        job_ids = [job_id for line in batch_store().lines(batch["id"]) for job_id in line.job_ids]
    past = utcnow() - timedelta(seconds=1)
    for job_id in job_ids:  # the window ran out with no worker to take the lines
        store._update(job_id, lambda job: job.model_copy(update={"deadline": past}))
    assert sorted(store.expire_overdue(now=utcnow() + timedelta(days=2))) == sorted(job_ids)
    expired = client.get(f"/v1/batches/{batch['id']}").get_json()
    assert expired["status"] == "expired" and expired["request_counts"]["failed"] == 2
    assert expired["output_file_id"] is None
    rows = client.get(f"/v1/files/{expired['error_file_id']}/content").get_data(as_text=True).splitlines()
    assert {json.loads(row)["error"]["code"] for row in rows} == {"batch_expired"}


def test_chat_generates_to_the_models_limit_unless_told_and_completions_default_to_16():
    from web.openai.schema import ChatRequest, CompletionRequest

    messages = [{"role": "user", "content": "hi"}]
    assert "max_new_tokens" not in ChatRequest(model="m", messages=messages).parameters(0)
    assert ChatRequest(model="m", messages=messages, max_tokens=5).parameters(0)["max_new_tokens"] == 5
    assert CompletionRequest(model="m", prompt="hi").parameters(0)["max_new_tokens"] == 16

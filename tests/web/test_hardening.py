"""Transport limits, admission control and metrics."""

import pytest

from config.settings import Settings
from jobs.schema import MIN_PROBABILITY_MASS, JobOutput
from web import create_app


@pytest.fixture()
def small_app(redis_server, redis_client):
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", max_body_bytes=2000, max_queue=3))
    app.config["TESTING"] = True
    return app


def test_a_body_over_the_limit_is_a_json_413(small_app, redis_client):
    response = small_app.test_client().post("/api/v1/jobs", json={"inputs": "x" * 5000})
    assert response.status_code == 413 and response.get_json()["error"]["type"] == "payload_too_large"
    assert redis_client.keys("bloomq:job:*") == []


def test_a_full_queue_is_a_429_with_retry_after_and_writes_nothing(small_app, redis_client):
    client = small_app.test_client()
    for _ in range(3):
        assert client.post("/api/v1/jobs", json={"inputs": "hi"}).status_code == 202
    response = client.post("/api/v1/jobs", json={"inputs": "hi"})
    assert response.status_code == 429
    assert response.headers["Retry-After"].isdigit()
    assert response.get_json()["error"]["type"] == "queue_full"
    assert len(redis_client.keys("bloomq:job:*")) == 3 and redis_client.llen("bloomq.tiny-bloom") == 3


def test_metrics_count_jobs_by_model_and_status(client, app):
    store = app.extensions["bloomq"].store
    ids = [client.post("/api/v1/jobs", json={"inputs": "hi"}).get_json()["id"] for _ in range(3)]
    store.start(ids[0], "w")
    store.succeed(ids[0], JobOutput(generated_text="x", generated_tokens=12, finish_reason="length"), 0.4)
    client.post(f"/api/v1/jobs/{ids[1]}/cancel")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'bloomq_jobs_submitted_total{model="tiny-bloom"} 3.0' in body
    assert 'bloomq_jobs_finished_total{model="tiny-bloom",status="succeeded"} 1.0' in body
    assert 'bloomq_jobs_finished_total{model="tiny-bloom",status="canceled"} 1.0' in body
    assert 'bloomq_generated_tokens_bucket{le="16",model="tiny-bloom"} 1.0' in body
    assert 'bloomq_inference_seconds_sum{model="tiny-bloom"} 0.4' in body
    assert 'bloomq_queue_depth{model="tiny-bloom"} 3.0' in body
    assert 'bloomq_live_workers{model="tiny-bloom"} 0.0' in body


def test_metrics_speak_the_format_the_scraper_asks_for_with_a_content_type_it_parses(client):
    from email.message import Message

    for accept, kind, version in ((None, "text/plain", "0.0.4"),
                                  ("application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                                   "application/openmetrics-text", "1.0.0")):
        response = client.get("/metrics", headers={"Accept": accept} if accept else {})
        header = response.headers["Content-Type"]
        assert header.lower().count("charset") == 1, header  # a repeated parameter fails Go's mime parser
        parsed = Message()
        parsed["Content-Type"] = header
        assert (parsed.get_content_type(), parsed.get_param("version")) == (kind, version)
        body = response.get_data(as_text=True)
        assert "bloomq_queue_depth" in body and body.rstrip().endswith("# EOF") == (kind != "text/plain")


def test_openapi_document_names_every_api_route_and_method_resolves_every_reference_and_states_the_keys(client, app):
    import json as json_module
    import re as re_module

    from web.http.auth import OPEN_API_PATHS

    doc = client.get("/api/v1/openapi.json").get_json()
    documented = {(path, method.upper()) for path, item in doc["paths"].items() for method in item}
    routed = set()
    for rule in app.url_map.iter_rules():
        path = re_module.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        if path.startswith(("/api/", "/v1/", "/models/", "/healthz", "/readyz")):
            routed |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routed == documented, (sorted(routed - documented), sorted(documented - routed))
    refs = set(re_module.findall(r"#/components/schemas/([\w.-]+)", json_module.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"]), sorted(refs - set(doc["components"]["schemas"]))
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            keyed = path not in OPEN_API_PATHS
            assert ("401" in operation["responses"]) == keyed, (path, method)
            assert (operation.get("security") == [{"apiKey": []}, {}]) == keyed, (path, method)
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_openapi_document_describes_the_request_schema_that_validates(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    params = doc["components"]["schemas"]["GenerateParameters"]["properties"]
    assert params["top_p"]["anyOf"][0]["minimum"] == MIN_PROBABILITY_MASS and params["top_p"]["anyOf"][0]["maximum"] == 1
    assert set(doc["paths"]) >= {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel",
                                 "/api/v1/jobs/{job_id}/events", "/api/v1/models", "/healthz", "/readyz"}


def test_prompt_length_is_checked_at_submit_with_the_models_own_tokenizer(redis_server, redis_client, tiny_model_dir):
    app = create_app(Settings(redis_url=redis_server.url, model=str(tiny_model_dir)))
    client = app.test_client()
    too_long = client.post("/api/v1/jobs", json={"inputs": "Once upon a time " * 400})
    assert too_long.status_code == 422
    field = too_long.get_json()["error"]["fields"][0]
    assert field["name"] == "inputs" and "accepts at most 1024" in field["message"]
    no_room = client.post("/api/v1/jobs", json={"inputs": "Once upon a time there was", "parameters": {"max_length": 3}})
    assert no_room.status_code == 422 and no_room.get_json()["error"]["fields"][0]["name"] == "parameters.max_length"
    over_total = client.post("/api/v1/jobs", json={"inputs": "Once upon a time " * 200,
                                                   "parameters": {"max_new_tokens": 2000}})
    assert over_total.get_json()["error"]["fields"][0]["name"] == "parameters.max_new_tokens"
    assert client.post("/api/v1/jobs", json={"inputs": "Once upon a time"}).status_code == 202
    assert redis_client.llen("bloomq.tiny-bloom") == 1  # only the valid one was queued


def test_without_replica_acknowledgement_a_submission_is_a_503_and_leaves_nothing(redis_server, redis_client):
    # BLOOMQ_REDIS_MIN_REPLICAS=1 on a Redis without replicas: WAIT times out, so nothing is accepted.
    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", redis_min_replicas=1,
                              redis_replica_wait_seconds=0.1))
    client = app.test_client()
    response = client.post("/api/v1/jobs", json={"inputs": "hi"}, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.get_json()["error"]["type"] == "unavailable"
    assert redis_client.keys("bloomq:job:*") == [] and redis_client.keys("bloomq:idem*") == []
    assert redis_client.llen("bloomq.tiny-bloom") == 0  # the Celery message was withdrawn too


def test_an_idempotency_conflict_leaves_the_key_bound_to_its_job(client):
    first = client.post("/api/v1/jobs", json={"inputs": "a"}, headers={"Idempotency-Key": "same"})
    conflict = client.post("/api/v1/jobs", json={"inputs": "b"}, headers={"Idempotency-Key": "same"})
    again = client.post("/api/v1/jobs", json={"inputs": "a"}, headers={"Idempotency-Key": "same"})
    assert (first.status_code, conflict.status_code, again.status_code) == (202, 409, 200)
    assert again.get_json()["id"] == first.get_json()["id"]

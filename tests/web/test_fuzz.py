"""Schemathesis against the live app, every operation of its OpenAPI document: no 5xx, and every response
(status, content type, body) matches the document.

The list of operations is read from the document itself, so a route added to it is fuzzed without
touching this file.

One check is left out: ``positive_data_acceptance`` expects every schema-valid body to be accepted, but
some valid-looking bodies are refused on purpose (``2.0`` for an integer under strict parsing, a model name
that is not registered, a timeout over the server's maximum, a file id that was never uploaded); those get
a documented 4xx.

A fake worker plays the worker's part through the store, as the other web tests do: it takes every
queued job (interactive or batch line), streams one token and finishes it, so the routes that wait for
their jobs (``/v1/completions``, ``/v1/chat/completions``, ``/models/...``) answer with their result and
their streams end. ``BLOOMQ_COMPAT_WAIT_SECONDS`` is set low, so a job it missed would surface as a quick
``504`` failure, never a hung run.

Random strings seldom name a model, file, batch or job that exists, so about half of the generated cases
are steered: a path parameter or body field that names one is set to one that exists (still a valid value
for its schema), so the routes are exercised past their lookups too (results, streams, batch output).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from config.settings import Settings
from jobs.keys import queued_key
from jobs.progress import ProgressUpdate
from jobs.schema import FinishReason, GenerationDetails, Job, JobOutput, TokenDetail
from jobs.workers import WorkerInfo
from web import create_app
from web.native.openapi import build_openapi

pytestmark = pytest.mark.slow  # every operation fuzzed from the OpenAPI document: left out of make test-fast

SERVED = "tiny-bloom"  # the default model, served by the fake worker
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
WORKER = WorkerInfo(name=f"{SERVED}@h.cpu", instance=f"{SERVED}@h.cpu:1", model=SERVED, host="h", device="cpu",
                    dtype="float32", pid=1)

EXAMPLES = 80  # per operation: the whole file runs in about 15 s on two cores


def _document_operation_ids() -> list[str]:
    document = build_openapi("0")
    # The document's own route is left out: schemathesis does not list the path it loaded the schema from.
    return [operation["operationId"] for item in document["paths"].values() for operation in item.values()
            if operation["operationId"] != "openapi"]


OPERATION_IDS = _document_operation_ids()


def test_every_surface_is_in_the_document():
    expected = {
        # the job API
        "submitJob", "listJobs", "getJob", "cancelJob", "jobEvents", "listModels", "listWorkers", "health", "ready",
        # OpenAI
        "openaiListModels", "openaiGetModel", "openaiCompletions", "openaiChat",
        # Hugging Face Inference API / TGI
        "hfInference", "tgiGenerate", "tgiGenerateStream", "tgiInfo", "tgiHealth",
        # OpenAI files and batches
        "uploadFile", "listFiles", "getFile", "fileContent", "deleteFile",
        "createBatch", "listBatches", "getBatch", "cancelBatch",
    }
    assert expected <= set(OPERATION_IDS), expected - set(OPERATION_IDS)
    assert len(OPERATION_IDS) == len(set(OPERATION_IDS)), "operationIds must be unique"


@pytest.fixture()
def settings_(redis_server, redis_client):
    return Settings(redis_url=redis_server.url, model=f"/models/{SERVED}", extra_models=("bloom-1b7",),
                    chat_templates={SERVED: CHAT_TEMPLATE}, compat_wait_seconds=3.0)


@pytest.fixture()
def app(settings_):
    app = create_app(settings_)
    app.config["TESTING"] = True
    return app


def _finish(store, job: Job) -> None:
    """What a worker does with a job: start it, report a token, store its result."""
    started = store.start(job.id, WORKER.name, WORKER.instance)
    if started is None or started.status.value != "running":
        return
    params = started.parameters
    token = TokenDetail(id=1, text="x", logprob=-0.5)
    top = max(params.top_n_tokens or 0, 1)
    details = GenerationDetails(
        prefill=[TokenDetail(id=2, text=started.inputs[:1] or "p", logprob=None)] if params.decoder_input_details else [],
        tokens=[token],
        top_tokens=[[TokenDetail(id=i + 1, text="x", logprob=-0.5 - i) for i in range(top)]]
        if params.top_n_tokens else None,
    ) if params.details else None
    store.publish_progress([ProgressUpdate(started.id, "x", 1, attempt=started.attempts,
                                           token_details=[token.model_dump()] if params.details else None)])
    text = (started.inputs if params.return_full_text else "") + "x"
    output = JobOutput(generated_text=text, generated_tokens=1, finish_reason=FinishReason.LENGTH,
                       seed=params.seed, prompt_tokens=1, details=details)
    store.succeed(started.id, output, 0.01, attempt=started.attempts)


@pytest.fixture()
def worker(app) -> Iterator[None]:
    """A live worker for every configured model: announced (so /readyz and TGI /health answer 200), and
    running every job that is queued."""
    svc = app.extensions["bloomq"]
    models = svc.registry.names()
    for model in models:
        info = WORKER.model_copy(update={"name": f"{model}@h.cpu", "instance": f"{model}@h.cpu:1", "model": model})
        svc.directory.announce(info, ttl_seconds=120)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            found = False
            for model in models:
                for raw in svc.store.redis.zrange(queued_key(model), 0, -1):
                    job = svc.store.get(raw.decode())
                    if job is not None:
                        _finish(svc.store, job)
                        found = True
                while (job_id := svc.batch_queue.take(model, WORKER.instance)) is not None:
                    job = svc.store.get(job_id)
                    if job is not None:
                        _finish(svc.store, job)
                    svc.batch_queue.done(WORKER.instance, job_id)
                    found = True
            if not found:
                stop.wait(0.005)

    thread = threading.Thread(target=run, name="fake-worker", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


def _resources(client) -> dict[str, list[str]]:
    """A job, an uploaded batch file, a batch (finished by the fake worker) and its result files."""
    job = client.post("/api/v1/jobs", json={"inputs": "hi", "model": SERVED})
    assert job.status_code == 202, job.get_data(as_text=True)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": SERVED, "prompt": "hi", "max_tokens": 2}} for i in range(2)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")},
                         content_type="multipart/form-data")
    assert upload.status_code == 200, upload.get_data(as_text=True)
    file_id = upload.get_json()["id"]
    made = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                            "completion_window": "24h"})
    assert made.status_code == 200, made.get_data(as_text=True)
    batch_id = made.get_json()["id"]
    deadline = time.monotonic() + 10
    while client.get(f"/v1/batches/{batch_id}").get_json()["status"] != "completed":
        assert time.monotonic() < deadline, "the fake worker did not finish the batch"
        time.sleep(0.02)
    return {"job_id": [job.get_json()["id"]], "name": [SERVED], "model": [SERVED],
            "file_id": [file_id, f"file-{batch_id}-output", f"file-{batch_id}-errors"], "batch_id": [batch_id],
            "input_file_id": [file_id]}


def _streams(operation: Any) -> bool:
    """Whether the operation's JSON body has a ``stream`` switch (the generator seldom turns it on)."""
    document = build_openapi("0")
    body = operation.definition.raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    name = body.get("schema", {}).get("$ref", "").rpartition("/")[2]
    return "stream" in document["components"]["schemas"].get(name, {}).get("properties", {})


def _steer(case: Any, known: dict[str, list[str]], pick: int, streams: bool) -> None:
    """Point the case's path parameters and body fields that name something at something that exists, and
    stream every other steered case of an operation that can."""
    for name, value in list((case.path_parameters or {}).items()):
        if name in known and isinstance(value, str):
            case.path_parameters[name] = known[name][pick % len(known[name])]
    if isinstance(case.body, dict):
        for name in ("model", "input_file_id"):
            if isinstance(case.body.get(name), str):
                case.body[name] = known[name][pick % len(known[name])]
        if streams:
            case.body["stream"] = pick % 2 == 0


@pytest.mark.parametrize("operation_id", OPERATION_IDS)
def test_api_never_errors_and_matches_its_schema(app, worker, operation_id):
    known = _resources(app.test_client())
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    (operation,) = [op for op in (r.ok() for r in schema.get_all_operations())
                    if op.definition.raw.get("operationId") == operation_id]
    streams = _streams(operation)

    @given(case=operation.as_strategy(), steer=st.booleans(), pick=st.integers(min_value=0, max_value=5))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case, steer, pick):
        if steer:
            _steer(case, known, pick, streams)
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()

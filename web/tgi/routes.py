"""The Hugging Face Inference API / Text Generation Inference, one base URL per model: ``/models/<name>``.

``<name>`` is a model's short name (``bloom-560m``) or its full reference (``bigscience/bloom-560m``), so
a script written for ``https://api-inference.huggingface.co/models/bigscience/bloom-560m``, or an
``InferenceClient(base_url=...)``, works by changing the host. Every request is a job in the same queue as
any other (its id in the ``X-Bloomq-Job-Id`` header).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, stream_with_context
from pydantic import ValidationError

from config.models import ModelSpec
from jobs.schema import MAX_STOP_SEQUENCES, FinishReason, Job, JobRequest, TokenDetail
from web.http.auth import authenticate_api, current_owner
from web.http.bodies import read_json_object
from web.http.context import JOB_ID_HEADER, current_service, version
from web.http.errors import ApiError, field_errors
from web.http.feeds import JobFeeds
from web.http.relay import (
    cancel_unfinished,
    failure_message,
    follow_jobs,
    late_error,
    unfinished_error,
    wait_until_succeeded,
    watched_submission,
)
from web.http.watchers import Watch
from web.tgi.schema import MAX_BEST_OF, TgiRequest

tgi_api = Blueprint("tgi_api", __name__, url_prefix="/models")
tgi_api.before_request(authenticate_api)


def _spec(name: str) -> ModelSpec:
    spec = current_service().served_spec_for(name)
    if spec is None:
        raise ApiError(404, "not_found", f"Model {name} is not served here (GET /api/v1/models lists those that are)")
    return spec


def _read() -> tuple[TgiRequest, dict[str, Any]]:
    """The request and the job parameters it asks for (TGI's checks, then the job API's)."""
    try:
        req = TgiRequest.model_validate(read_json_object())
    except ValidationError as exc:
        fields = field_errors(exc)
        raise ApiError(422, "validation", f"{fields[0]['name']}: {fields[0]['message']}", fields) from None
    p = req.parameters
    for name, refused in (("frequency_penalty", bool(p.frequency_penalty)), ("grammar", p.grammar is not None),
                          ("watermark", p.watermark), ("adapter_id", p.adapter_id is not None)):
        if refused:
            raise ApiError(422, "validation", f"{name} is not supported by bloomq", [{"name": name, "message": ""}])
    if p.best_of and p.best_of > 1 and (req.stream or p.do_sample is False or p.temperature == 0):
        raise ApiError(422, "validation", "best_of > 1 needs sampling and cannot be streamed",
                       [{"name": "best_of", "message": "sampling only, not streamed"}])
    params = p.model_dump(exclude_none=True, exclude={"best_of", "frequency_penalty", "grammar", "watermark",
                                                       "adapter_id", "return_full_text"})
    # False unless asked for, on every route ("/" too), as TGI does: InferenceClient expects the new text only.
    params["return_full_text"] = bool(p.return_full_text)
    return req, params


def _submit(spec: ModelSpec, inputs: str, params: list[dict[str, Any]]) -> tuple[Watch, list[Job]]:
    """The client's watcher slot, then one job per parameter set, all queued or none."""
    requests = []
    for job_params in params:
        try:
            requests.append(JobRequest.model_validate({"inputs": inputs, "model": spec.name, "parameters": job_params}))
        except ValidationError as exc:
            fields = field_errors(exc)
            raise ApiError(422, "validation", f"{fields[0]['name']}: {fields[0]['message']}", fields) from None
    svc = current_service()
    return watched_submission(svc, lambda: svc.submit_all(requests, owner=current_owner())[0])


@tgi_api.post("/<path:name>")
def hosted(name: str) -> Response:
    """The hosted Inference API's route (TGI's ``/``): a list with one result, or the token stream."""
    spec = _spec(name)
    req, params = _read()
    if req.stream:
        return _stream(spec, req.inputs, params)
    result, headers = _generate(spec, req, params)
    response = jsonify([result])
    response.headers.update(headers)
    return response


@tgi_api.post("/<path:name>/generate")
def generate(name: str) -> Response:
    """TGI's ``/generate``: ``{"generated_text", "details"?}``."""
    spec = _spec(name)
    req, params = _read()
    result, headers = _generate(spec, req, params)
    response = jsonify(result)
    response.headers.update(headers)
    return response


@tgi_api.post("/<path:name>/generate_stream")
def generate_stream(name: str) -> Response:
    """TGI's ``/generate_stream``: one event per token, the last with ``generated_text`` and details."""
    spec = _spec(name)
    req, params = _read()
    return _stream(spec, req.inputs, params)


@tgi_api.get("/<path:name>/info")
def info(name: str) -> Response:
    """TGI's ``/info``."""
    spec = _spec(name)
    svc = current_service()
    workers = [w for w in svc.live_workers() if w.model == spec.name]
    first = workers[0] if workers else None
    return jsonify({
        "model_id": spec.source,
        "model_sha": None,
        "model_dtype": first.dtype if first else None,
        "model_device_type": ("cpu" if first.device == "cpu" else "cuda") if first else None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": svc.settings.max_queue,
        "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": spec.max_input_tokens,
        "max_input_length": spec.max_input_tokens,
        "max_total_tokens": spec.max_total_tokens,
        "max_batch_size": first.batch_capacity if first else None,
        "max_batch_total_tokens": None,
        "max_waiting_tokens": 0,
        "waiting_served_ratio": 0.0,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "bloomq",
        "version": version(),
        "sha": None,
        "docker_label": None,
        "workers": len(workers),
    })


@tgi_api.get("/<path:name>/health")
def health(name: str) -> Response:
    """200 when a worker serving the model is live; 503 (TGI's shape) when none is."""
    spec = _spec(name)
    if not current_service().has_live_worker(spec.name):
        raise ApiError(503, "unhealthy", f"no live worker serves {spec.name}; jobs wait in its queue")
    return jsonify({})


def _generate(spec: ModelSpec, req: TgiRequest, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the request (``best_of`` jobs when asked) and build TGI's result and timing headers."""
    best_of = req.parameters.best_of or 1
    if best_of > 1:
        params = {**params, "details": True, "do_sample": True}
    choices = []
    for i in range(best_of):
        job_params = dict(params)
        if best_of > 1 and "seed" in params:
            job_params["seed"] = params["seed"] + i
        choices.append(job_params)
    slot, jobs = _submit(spec, req.inputs, choices)
    done = wait_until_succeeded(current_service(), jobs, _job_error, slot)
    done.sort(key=_score, reverse=True)  # best_of: the most likely sequence first
    best = done[0]
    result: dict[str, Any] = {"generated_text": best.output.generated_text}
    if req.parameters.details:
        details = _details(best)
        if best_of > 1:
            details["best_of_sequences"] = [{"generated_text": job.output.generated_text, **_details(job)}
                                            for job in done[1:]]
        result["details"] = details
    return result, _headers(best, [job.id for job in done])


def _score(job: Job) -> float:
    details = job.output.details if job.output else None
    return sum(t.logprob or 0.0 for t in details.tokens) if details else 0.0


def _details(job: Job) -> dict[str, Any]:
    output = job.output
    assert output is not None
    details = output.details
    body: dict[str, Any] = {
        "finish_reason": (output.finish_reason or FinishReason.LENGTH).value,
        "generated_tokens": output.generated_tokens,
        "seed": output.seed,
        "prefill": [_token(t, prefill=True) for t in details.prefill] if details else [],
        "tokens": [_token(t) for t in details.tokens] if details else [],
    }
    if details is not None and details.top_tokens is not None:
        body["top_tokens"] = [[_token(t) for t in step] for step in details.top_tokens]
    return body


def _token(token: TokenDetail, prefill: bool = False) -> dict[str, Any]:
    body = token.model_dump()
    if prefill:
        body.pop("special")
    return body


def _headers(job: Job, job_ids: list[str]) -> dict[str, str]:
    """TGI's timing headers, from the job's metrics (milliseconds, compute time in seconds)."""
    m, output = job.metrics, job.output
    queue, inference = m.queue_seconds or 0.0, m.inference_seconds or 0.0
    return {
        "x-compute-type": "cpu" if (job.worker or "").endswith(".cpu") else "gpu",
        "x-compute-time": f"{queue + inference:.6f}",
        "x-queue-time": str(round(queue * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round((m.seconds_per_token or 0.0) * 1000)),
        "x-prompt-tokens": str(output.prompt_tokens or 0) if output else "0",
        "x-generated-tokens": str(output.generated_tokens) if output else "0",
        JOB_ID_HEADER: ",".join(job_ids),
    }


def _stream(spec: ModelSpec, inputs: str, params: dict[str, Any]) -> Response:
    """TGI's token stream. The job reports every token (``details``), so each becomes one event."""
    svc = current_service()
    feeds: JobFeeds = current_app.extensions["bloomq.feeds"]
    slot, (job,) = _submit(spec, inputs, [{**params, "details": True}])

    def event(body: dict[str, Any]) -> str:
        return f"data:{json.dumps(body, ensure_ascii=False)}\n\n"

    def generate() -> Iterator[str]:
        sent = 0  # tokens the client has: a job that starts over regenerates them, and they are not resent
        attempt_tokens = 0
        attempt = 0
        held: dict[str, Any] | None = None  # the newest token: the last one goes out with the details
        completed = False
        try:
            yield ":\n\n"  # the headers go out now: the client knows its job was accepted
            for item in follow_jobs(feeds, [job.id], seconds=svc.settings.compat_wait_limit):
                if item is None:
                    yield ":\n\n"  # keep-alive comment
                    continue
                if item.name == "status" and item.data.get("attempt", 0) > attempt:
                    attempt, attempt_tokens = item.data["attempt"], 0
                elif item.name == "restart" and item.data.get("attempt") == attempt:
                    attempt_tokens = 0
                elif item.name == "token" and item.data.get("attempt", attempt) == attempt:
                    for token in item.data.get("tokens", []):
                        attempt_tokens += 1
                        if attempt_tokens <= sent:
                            continue
                        if held is not None:
                            yield event({"index": sent - 1, "token": held, "generated_text": None, "details": None})
                        held, sent = token, attempt_tokens
                elif item.name == "done":
                    final = Job.model_validate(item.data)
                    if final.status.value != "succeeded" or final.output is None or held is None:
                        err = _job_error(final) if final.status.value != "succeeded" else None
                        message = err.message if err else "the job generated no token"
                        yield event({"error": message, "error_type": "generation"})
                        completed = True
                        return
                    output = final.output
                    details = {"finish_reason": (output.finish_reason or FinishReason.LENGTH).value,
                               "generated_tokens": output.generated_tokens, "seed": output.seed,
                               "input_length": output.prompt_tokens or 0}
                    yield event({"index": sent - 1, "token": held, "generated_text": output.generated_text,
                                 "details": details})
                    completed = True
                    return
            # BLOOMQ_COMPAT_WAIT_SECONDS passed without the done event: the job goes on, as after a 504
            yield event({"error": late_error(job.id).message, "error_type": "generation"})
            completed = True
        except Exception as exc:  # after the stream began, an error is an event
            yield event({"error": str(exc), "error_type": "generation"})
            completed = True
        finally:
            if not completed:
                cancel_unfinished(svc, [job.id])  # the client went away mid-stream
            slot.release()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_ID_HEADER: job.id}
    return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


def _job_error(job: Job) -> ApiError:
    late = unfinished_error(job)
    if late is not None:
        return late
    if job.error is not None and job.error.type == "validation_error":
        return ApiError(422, "validation", failure_message(job))
    return ApiError(424, "generation", failure_message(job))

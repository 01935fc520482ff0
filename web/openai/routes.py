"""The OpenAI-compatible API under ``/v1``: models, completions, and chat completions for models that have
a chat template. Every request becomes one job per choice in the same queue as any other job (same
record, same owner, visible at ``/api/v1/jobs/<id>``); the ids are in the ``X-Bloomq-Job-Id`` header.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from pydantic import ValidationError

from jobs.schema import Job
from web.http.auth import authenticate_api, current_owner
from web.http.bodies import idempotency_key, read_json_object
from web.http.context import current_service
from web.http.errors import ApiError, field_errors
from web.http.relay import (
    watched_submission,
)
from web.openai.completion import Completion, chat_logprobs, completion_choices, finish_reason
from web.openai.schema import (
    ChatRequest,
    CompletionRequest,
    check_completion,
    completion_jobs,
    job_requests,
    renamed,
)
from web.services.chat import ChatTemplateError, render_chat

openai_api = Blueprint("openai_api", __name__, url_prefix="/v1")
openai_api.before_request(authenticate_api)


def _invalid(exc: ValidationError) -> ApiError:
    fields = field_errors(exc)
    for item in fields:  # OpenAI names the top-level parameter
        item["name"] = item["name"].split(".")[0]
    return ApiError(422, "invalid_request_error", f"{fields[0]['name']}: {fields[0]['message']}", fields)


@openai_api.get("/models")
def list_models() -> Response:
    """Every model a job may use now: the configured ones and any a live worker serves."""
    created = current_app.extensions["bloomq.started"]
    data = [
        {"id": m["name"], "object": "model", "created": created, "owned_by": "bloomq",
         "max_model_len": m["max_total_tokens"]}
        for m in current_service().models()
    ]
    return jsonify({"object": "list", "data": data})


@openai_api.get("/models/<path:model>")
def get_model(model: str) -> Response:
    """One model, or a 404 ``model_not_found``."""
    spec = _spec(model)
    created = current_app.extensions["bloomq.started"]
    return jsonify({"id": spec.name, "object": "model", "created": created, "owned_by": "bloomq",
                    "max_model_len": spec.max_total_tokens})


def _spec(model: str):  # noqa: ANN202 - a ModelSpec
    spec = current_service().served_spec_for(model)
    if spec is None:
        raise ApiError(404, "model_not_found", f"The model '{model}' is not served here (GET /v1/models lists those "
                       "that are)", [{"name": "model", "message": "not served here"}])
    return spec


@openai_api.post("/completions")
def completions() -> Response:
    """Text completions: one job per prompt and choice."""
    try:
        req = CompletionRequest.model_validate(read_json_object())
    except ValidationError as exc:
        raise _invalid(exc) from None
    check_completion(req)
    spec = _spec(req.model)
    slot, jobs = watched_submission(current_service(), lambda: submit_jobs(spec.name, completion_jobs(req),
                                                                    req.max_tokens is None, spec.max_total_tokens))
    completion = Completion(f"cmpl-{uuid.uuid4().hex}", spec.name, "text_completion", len(req.prompts), req.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return completion.stream(jobs, slot, include_usage, logprobs=req.logprobs is not None, echo=req.echo)
    done = completion.wait(jobs, slot)
    return completion.respond(done, completion_choices(done, req))


@openai_api.post("/chat/completions")
def chat_completions() -> Response:
    """Chat, for a model whose operator configured a chat template; a 400 pointing to /v1/completions else."""
    try:
        req = ChatRequest.model_validate(read_json_object())
    except ValidationError as exc:
        raise _invalid(exc) from None
    bad = req.unsupported()
    if bad:
        raise ApiError(422, "invalid_request_error", bad[1], [{"name": bad[0], "message": bad[1]}])
    spec = _spec(req.model)
    template = current_service().settings.chat_templates.get(spec.name)
    if template is None:
        raise ApiError(422, "model_not_chat",
                       f"{spec.name} has no chat template: BLOOM and BLOOMZ are not chat models. Use /v1/completions "
                       "with a prompt, or ask the operator to configure a template (BLOOMQ_CHAT_TEMPLATES)",
                       [{"name": "model", "message": "no chat template for this model"}])
    try:
        prompt = render_chat(template, [m.model_dump() for m in req.messages])
    except ChatTemplateError as exc:
        raise ApiError(422, "invalid_request_error", f"messages: {exc}", [{"name": "messages", "message": str(exc)}]) from None
    if req.max_completion_tokens is not None:
        req.max_tokens = req.max_completion_tokens
    top = req.top_logprobs or 0
    inputs = [(prompt, req.parameters(choice, top if req.logprobs else None)) for choice in range(req.n)]
    slot, jobs = watched_submission(current_service(), lambda: submit_jobs(spec.name, inputs, req.max_tokens is None,
                                                                    spec.max_total_tokens))
    completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", spec.name, "chat.completion", 1, req.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return completion.stream(jobs, slot, include_usage, logprobs=bool(req.logprobs), echo=False)
    done = completion.wait(jobs, slot)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": job.output.generated_text},
         "logprobs": chat_logprobs(job) if req.logprobs else None, "finish_reason": finish_reason(job)}
        for i, job in enumerate(done)
    ]
    return completion.respond(done, choices)


def submit_jobs(model: str, inputs: list[tuple[str, dict[str, Any]]], to_the_limit: bool, total: int) -> list[Job]:
    """Every job of a request queued, or none (an error naming the OpenAI parameter when one is refused)."""
    requests = job_requests(model, inputs, to_the_limit, total)
    key = idempotency_key()
    try:
        jobs, _ = current_service().submit_all(requests, key, current_owner())
    except ApiError as err:
        raise renamed(err) from None
    return jobs



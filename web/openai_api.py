"""The OpenAI-compatible API under ``/v1``: models, completions, and chat completions for models that have
a chat template. Every request becomes one job per choice in the same queue as any other job (same
record, same owner, visible at ``/api/v1/jobs/<id>``); the ids are in the ``X-Bloomq-Job-Id`` header.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, stream_with_context
from pydantic import ValidationError

from jobs.schema import FinishReason, Job, JobRequest
from web.api import idempotency_key, read_json_object
from web.auth import authenticate_api, current_owner
from web.chat import ChatTemplateError, render_chat
from web.context import JOB_ID_HEADER, current_service
from web.errors import ApiError, field_errors
from web.feeds import JobFeeds
from web.openai_schema import ChatRequest, CompletionRequest, check_completion, completion_jobs
from web.relay import (
    JobEvent,
    TextRelay,
    cancel_unfinished,
    failure_message,
    follow_jobs,
    late_error,
    unfinished_error,
    wait_until_succeeded,
    watched_submission,
)
from web.watchers import Watch

openai_api = Blueprint("openai_api", __name__, url_prefix="/v1")
openai_api.before_request(authenticate_api)


@openai_api.errorhandler(ApiError)
def openai_error(err: ApiError) -> Response:
    """Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    status = 400 if err.status == 422 else err.status
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = err.fields[0]["name"] if err.fields else None
    code = "model_not_found" if err.type == "model_not_found" else err.type
    response = jsonify({"error": {"message": err.message, "type": kind, "param": param, "code": code}})
    response.status_code = status
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="bloomq"'
    return response


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
    spec = current_service().spec_for(model)
    if spec is None:
        raise ApiError(404, "model_not_found", f"The model '{model}' does not exist (GET /v1/models lists them)",
                       [{"name": "model", "message": "unknown model"}])
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
    elif "max_tokens" not in req.model_fields_set:
        req.max_tokens = None  # chat's default: as many as the model allows
    top = req.top_logprobs or 0
    inputs = [(prompt, req.parameters(choice, top if req.logprobs else None)) for choice in range(req.n)]
    slot, jobs = watched_submission(current_service(), lambda: submit_jobs(spec.name, inputs, req.max_tokens is None,
                                                                    spec.max_total_tokens))
    completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", spec.name, "chat.completion", 1, req.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return completion.stream(jobs, slot, include_usage, logprobs=False, echo=False)
    done = completion.wait(jobs, slot)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": job.output.generated_text},
         "logprobs": _chat_logprobs(job) if req.logprobs else None, "finish_reason": _finish(job)}
        for i, job in enumerate(done)
    ]
    return completion.respond(done, choices)


def job_requests(model: str, inputs: list[tuple[str, dict[str, Any]]], to_the_limit: bool, total: int
                 ) -> list[JobRequest]:
    """One job request per (prompt, parameters); an error naming the OpenAI parameter when one is refused."""
    requests = []
    for prompt, params in inputs:
        if to_the_limit:
            params = {**params, "max_length": total}
        try:
            requests.append(JobRequest.model_validate({"inputs": prompt, "model": model, "parameters": params}))
        except ValidationError as exc:
            raise _invalid_parameters(exc) from None
    return requests


def submit_jobs(model: str, inputs: list[tuple[str, dict[str, Any]]], to_the_limit: bool, total: int) -> list[Job]:
    """Every job of a request queued, or none (an error naming the OpenAI parameter when one is refused)."""
    requests = job_requests(model, inputs, to_the_limit, total)
    key = idempotency_key()
    try:
        jobs, _ = current_service().submit_all(requests, key, current_owner())
    except ApiError as err:
        raise renamed(err) from None
    return jobs


# Job API names -> the OpenAI parameter a client sent
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "max_length": "max_tokens", "inputs": "prompt",
                 "top_n_tokens": "logprobs", "seed": "seed", "stop": "stop"}


def _openai_name(name: str) -> str:
    parts = name.split(".")
    leaf = parts[1] if parts[0] == "parameters" and len(parts) > 1 else parts[0]
    return _OPENAI_NAMES.get(leaf, leaf)


def _invalid_parameters(exc: ValidationError) -> ApiError:
    fields = [{"name": _openai_name(f["name"]), "message": f["message"]} for f in field_errors(exc)]
    return ApiError(422, "invalid_request_error", f"{fields[0]['name']}: {fields[0]['message']}", fields)


def renamed(err: ApiError) -> ApiError:
    """A job API error with its fields named as the OpenAI parameters the client sent."""
    fields = [{"name": _openai_name(f["name"]), "message": f["message"]} for f in err.fields]
    return ApiError(err.status, err.type, err.message, fields, err.retry_after)


class Completion:
    """One OpenAI response (or stream) over the jobs of a request."""

    def __init__(self, completion_id: str, model: str, kind: str, prompts: int, n: int) -> None:
        self.id = completion_id
        self.model = model
        self.kind = kind
        self.created = int(time.time())
        self.prompts = prompts
        self.n = n

    def wait(self, jobs: list[Job], slot: Watch) -> list[Job]:
        """The jobs once final, holding the client's connection (its watcher slot, no thread)."""
        return wait_until_succeeded(current_service(), jobs, _job_error, slot)

    def body(self, jobs: list[Job], choices: list[dict[str, Any]]) -> dict[str, Any]:
        """The response body over the finished ``jobs``."""
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(jobs)}

    def respond(self, jobs: list[Job], choices: list[dict[str, Any]]) -> Response:
        response = jsonify(self.body(jobs, choices))
        response.headers[JOB_ID_HEADER] = ",".join(job.id for job in jobs)
        return response

    def _usage(self, jobs: list[Job]) -> dict[str, int]:
        # A prompt is counted once however many choices it has.
        prompt = sum((jobs[i * self.n].output.prompt_tokens or 0) for i in range(self.prompts) if jobs[i * self.n].output)
        completion = sum(job.output.generated_tokens for job in jobs if job.output)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(self, jobs: list[Job], slot: Watch, include_usage: bool, logprobs: bool, echo: bool) -> Response:
        """Server-Sent Events: chunks of new text per choice, the finish reason on each choice's last chunk,
        the usage chunk when asked, then ``[DONE]``. A client that goes away cancels the jobs. The client's
        watcher ``slot`` is released when the stream ends."""
        svc = current_service()
        feeds: JobFeeds = current_app.extensions["bloomq.feeds"]
        job_ids = [job.id for job in jobs]
        chat = self.kind == "chat.completion"

        def chunk(index: int, text: str, finish: str | None = None, token_logprobs: Any = None) -> str:
            if chat:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text, "logprobs": token_logprobs, "finish_reason": finish}
            body = {"id": self.id, "object": f"{self.kind}.chunk" if chat else self.kind, "created": self.created,
                    "model": self.model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def generate() -> Iterator[str]:
            relays = [TextRelay() for _ in jobs]
            finals: list[Job | None] = [None] * len(jobs)
            completed = False
            try:
                yield ": keep-alive\n\n"  # the headers go out now: the client knows its jobs were accepted
                if chat:
                    for index in range(len(jobs)):
                        first = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": [{"index": index, "delta": {"role": "assistant",
                                 "content": ""}, "logprobs": None, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                if echo:
                    for index, job in enumerate(jobs):
                        yield chunk(index, job.inputs)
                for event in follow_jobs(feeds, job_ids, seconds=svc.settings.compat_wait_limit):
                    if event is None:
                        yield ": keep-alive\n\n"
                        continue
                    yield from self._relay_event(event, relays, finals, chunk, logprobs)
                    if event.name == "done" and finals[event.index] is not None:
                        job = finals[event.index]
                        if job.status.value != "succeeded":
                            err = _job_error(job)
                            yield f"data: {json.dumps(_error_body(err), ensure_ascii=False)}\n\n"
                            yield "data: [DONE]\n\n"
                            completed = True
                            return
                late = [job_id for job_id, final in zip(job_ids, finals, strict=True) if final is None]
                if late:  # BLOOMQ_COMPAT_WAIT_SECONDS passed: the jobs go on, as after a 504
                    yield f"data: {json.dumps(_error_body(late_error(late[0])), ensure_ascii=False)}\n\n"
                    yield "data: [DONE]\n\n"
                    completed = True
                    return
                if include_usage:
                    usage = {"id": self.id, "object": f"{self.kind}.chunk" if chat else self.kind,
                             "created": self.created, "model": self.model, "choices": [],
                             "usage": self._usage([j for j in finals if j is not None])}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                completed = True
            except Exception as exc:  # after the stream began, an error is an event, not a status code
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error', 'param': None, 'code': 'stream_failed'}})}\n\n"
                completed = True
            finally:
                if not completed:
                    cancel_unfinished(svc, job_ids)  # the client went away mid-stream
                slot.release()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_ID_HEADER: ",".join(job_ids)}
        return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)

    @staticmethod
    def _relay_event(event: JobEvent, relays: list[TextRelay], finals: list[Job | None], chunk, logprobs: bool
                     ) -> Iterator[str]:
        relay = relays[event.index]
        if event.name == "done":
            job = Job.model_validate(event.data)
            finals[event.index] = job
            if job.status.value == "succeeded" and job.output is not None:
                text = job.output.generated_text
                if job.parameters.return_full_text:
                    text = text[len(job.inputs):]
                rest = relay.finish(text)
                if rest:
                    yield chunk(event.index, rest)
                yield chunk(event.index, "", _finish(job))
            return
        text = relay.feed(event)
        if text:
            detail = None
            if logprobs and event.name == "token" and event.data.get("tokens"):
                tokens = event.data["tokens"]
                detail = {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                          "top_logprobs": None, "text_offset": None}
            yield chunk(event.index, text, None, detail)


def completion_choices(jobs: list[Job], req: CompletionRequest) -> list[dict[str, Any]]:
    """The ``choices`` of a completions response, one per (succeeded) job."""
    return [
        {"index": i, "text": job.output.generated_text if job.output else "",
         "logprobs": _logprobs(job, req.echo) if req.logprobs is not None else None, "finish_reason": _finish(job)}
        for i, job in enumerate(jobs)
    ]


def _finish(job: Job) -> str:
    reason = job.output.finish_reason if job.output else None
    return "stop" if reason in (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE) else "length"


def _job_error(job: Job) -> ApiError:
    """A job that did not succeed, as the error a compatible client expects."""
    late = unfinished_error(job)
    if late is not None:
        return late
    error, message = job.error, failure_message(job)
    if error is not None and error.type == "validation_error":
        name = error.message.split(":", 1)[0]
        return ApiError(422, "invalid_request_error", message, [{"name": _openai_name(name), "message": error.message}])
    status = 504 if error is not None and error.type in ("timeout", "expired") else 500
    return ApiError(status, error.type if error else "canceled", message)


def _error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": "server_error" if err.status >= 500 else "invalid_request_error",
                      "param": err.fields[0]["name"] if err.fields else None, "code": err.type}}


def _logprobs(job: Job, echo: bool) -> dict[str, Any] | None:
    """OpenAI's completions logprobs object from the job's token details."""
    details = job.output.details if job.output else None
    if details is None:
        return None
    tokens = (details.prefill if echo else []) + details.tokens
    tops: list[dict[str, float] | None] = [None] * (len(details.prefill) if echo else 0)
    if details.top_tokens is not None:
        tops += [{t.text: t.logprob for t in step} for step in details.top_tokens]
    else:
        tops += [None] * len(details.tokens)
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(job: Job) -> dict[str, Any] | None:
    """OpenAI's chat logprobs object (``content``: one entry per token)."""
    details = job.output.details if job.output else None
    if details is None:
        return None
    tops = details.top_tokens or [[] for _ in details.tokens]
    content = [
        {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
         "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())} for a in top]}
        for t, top in zip(details.tokens, tops, strict=False)
    ]
    return {"content": content}

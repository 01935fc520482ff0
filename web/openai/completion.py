"""OpenAI's completion objects (a response, or a stream of chunks) over the jobs of a request: the
completions and chat routes answer with them, and a batch's output file holds one per line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, jsonify, stream_with_context

from jobs.schema import FinishReason, Job
from web.http.context import JOB_ID_HEADER, current_service
from web.http.errors import ApiError, openai_error
from web.http.feeds import JobFeeds
from web.http.relay import (
    JobEvent,
    TextRelay,
    cancel_unfinished,
    failure_message,
    follow_jobs,
    late_error,
    unfinished_error,
    wait_until_succeeded,
)
from web.http.watchers import Watch
from web.openai.schema import CompletionRequest, openai_name


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
        return wait_until_succeeded(current_service(), jobs, job_error, slot)

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

        def chunk(index: int, text: str, finish: str | None = None, tokens: list[dict[str, Any]] | None = None) -> str:
            """One choice's chunk; ``tokens``: the token details of its text (jobs that asked for logprobs).
            Streams carry each token's own log-probability, not the top alternatives."""
            if chat:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                detail = {"content": [chat_token(t["text"], t["logprob"]) for t in tokens]} if tokens else None
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": detail, "finish_reason": finish}
            else:
                detail = {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                          "top_logprobs": None, "text_offset": None} if tokens else None
                choice = {"index": index, "text": text, "logprobs": detail, "finish_reason": finish}
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
                            err = job_error(job)
                            yield f"data: {json.dumps(openai_error(err)[0], ensure_ascii=False)}\n\n"
                            yield "data: [DONE]\n\n"
                            completed = True
                            return
                late = [job_id for job_id, final in zip(job_ids, finals, strict=True) if final is None]
                if late:  # BLOOMQ_COMPAT_WAIT_SECONDS passed: the jobs go on, as after a 504
                    yield f"data: {json.dumps(openai_error(late_error(late[0]))[0], ensure_ascii=False)}\n\n"
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
                yield chunk(event.index, "", finish_reason(job))
            return
        text = relay.feed(event)
        tokens = event.data.get("tokens") if logprobs and event.name == "token" else None
        if text or tokens:  # a token whose text is held back (part of a character) still has its logprob
            yield chunk(event.index, text, None, tokens)


def completion_choices(jobs: list[Job], req: CompletionRequest) -> list[dict[str, Any]]:
    """The ``choices`` of a completions response, one per (succeeded) job."""
    return [
        {"index": i, "text": job.output.generated_text if job.output else "",
         "logprobs": completion_logprobs(job, req.echo) if req.logprobs is not None else None, "finish_reason": finish_reason(job)}
        for i, job in enumerate(jobs)
    ]


def finish_reason(job: Job) -> str:
    reason = job.output.finish_reason if job.output else None
    return "stop" if reason in (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE) else "length"


def completion_logprobs(job: Job, echo: bool) -> dict[str, Any] | None:
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


def chat_logprobs(job: Job) -> dict[str, Any] | None:
    """OpenAI's chat logprobs object (``content``: one entry per token)."""
    details = job.output.details if job.output else None
    if details is None:
        return None
    tops = details.top_tokens or [[] for _ in details.tokens]
    content = [
        chat_token(t.text, t.logprob, [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())}
                                       for a in top])
        for t, top in zip(details.tokens, tops, strict=False)
    ]
    return {"content": content}


def chat_token(text: str, logprob: float | None, top: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One entry of a chat logprobs ``content`` list."""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": top or []}


def job_error(job: Job) -> ApiError:
    """A job that did not succeed, as the error a compatible client expects."""
    late = unfinished_error(job)
    if late is not None:
        return late
    error, message = job.error, failure_message(job)
    if error is not None and error.type == "validation_error":
        name = error.message.split(":", 1)[0]
        return ApiError(422, "invalid_request_error", message, [{"name": openai_name(name), "message": error.message}])
    status = 504 if error is not None and error.type in ("timeout", "expired") else 500
    return ApiError(status, error.type if error else "canceled", message)

"""The REST API (JSON): /api/v1/jobs, /api/v1/models, /healthz, /readyz."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context, url_for
from pydantic import ValidationError

from jobs.listing import OwnedPosition
from jobs.schema import Job, JobRequest, JobStatus
from jobs.transitions import CancelOutcome
from web.http.auth import authenticate_api, current_owner, is_operator, owner_of, require_operator
from web.http.bodies import idempotency_key, read_json_object
from web.http.context import current_service, version
from web.http.errors import ApiError, validation_error
from web.http.feeds import KEEPALIVE_SECONDS, Event, JobFeeds
from web.http.watchers import watch
from web.native.openapi import OPENAPI_PATH, build_openapi
from web.native.openapi_native import WorkerSummary
from web.ops.metrics import render_metrics

log = logging.getLogger(__name__)

PREFIX = "/api/v1"

api = Blueprint("api", __name__)
api.before_request(authenticate_api)


def job_resource(job: Job) -> dict[str, Any]:
    """A job as the API shows the caller, with its links; where it ran only to operator keys."""
    return job.to_resource(operator=is_operator())


@api.post(f"{PREFIX}/jobs")
def submit_job() -> Response:
    """Queue a generation job; 202 with the job resource and its Location."""
    try:
        job_request = JobRequest.model_validate(read_json_object())
    except ValidationError as exc:
        raise validation_error(exc) from None
    key = idempotency_key()
    svc = current_service()
    job, created = svc.submit(job_request, idempotency_key=key, owner=current_owner())
    body = job_resource(job)
    if not svc.has_live_worker(job.model):
        body["warnings"] = [f"no worker for model {job.model!r} is live; the job waits in its queue until one starts"]
    response = jsonify(body)
    # 202: a new job was queued; 200: the same Idempotency-Key and body already made this job.
    response.status_code = 202 if created else 200
    response.headers["Location"] = url_for("api.get_job", job_id=job.id)
    return response


MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20


@api.get(f"{PREFIX}/jobs")
def list_jobs() -> Response:
    """The caller's jobs, newest first. ``limit`` (1-100), ``cursor`` (or ``after``: the ``next_cursor`` of
    the previous page, or a job id), ``status`` (one of the job statuses) and, for operators, ``key`` (a
    key's name or owner id: that key's jobs)."""
    limit = _list_limit(request.args.get("limit"))
    status = _list_status(request.args.get("status"))
    name = "cursor" if request.args.get("cursor") else "after"
    after = _list_position(name, request.args.get(name) or None)
    try:
        owner = owner_of(request.args["key"]) if request.args.get("key") else current_owner()
        jobs, following = current_service().store.list_owned(owner, limit, after, status)
    except LookupError:
        raise _invalid(name, "not a job in your listing (unknown, another key's, or expired)") from None
    return jsonify({"jobs": [job_resource(job) for job in jobs],
                    "next_cursor": _encode_position(following) if following else None})


def _invalid(name: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{name}: {message}", [{"name": name, "message": message}])


def _list_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIST_LIMIT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIST_LIMIT:
        raise _invalid("limit", f"must be an integer from 1 to {MAX_LIST_LIMIT}")
    return value


def _list_status(raw: str | None) -> JobStatus | None:
    if raw is None or raw == "":
        return None
    try:
        return JobStatus(raw)
    except ValueError:
        raise _invalid("status", f"must be one of {', '.join(s.value for s in JobStatus)}") from None


def _encode_position(position: OwnedPosition) -> str:
    """An opaque cursor: where the next page starts."""
    raw = f"{position.created!r}/{position.job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _list_position(name: str, raw: str | None) -> OwnedPosition | str | None:
    """A cursor made by ``_encode_position``, or a job id (a string: the store finds its place)."""
    if raw is None or _is_uuid(raw):
        return raw
    try:
        created, _, job_id = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode().partition("/")
        position = OwnedPosition(float(created), job_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        position = None
    if position is None or not math.isfinite(position.created) or not _is_uuid(position.job_id):
        raise _invalid(name, "not a cursor this API gave, nor a job id")
    return position


MAX_WAIT_SECONDS = 60


@api.get(f"{PREFIX}/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """The job resource, or 404. ``?wait=N`` (N <= 60) answers once the job is final or N seconds pass."""
    _require_uuid(job_id)
    wait = _wait_seconds(request.args.get("wait"))
    svc = current_service()
    if wait == 0:
        return jsonify(job_resource(svc.get(job_id, current_owner())))
    with watch(wait):
        job = svc.wait(job_id, wait, current_owner())
    return jsonify(job_resource(job))


def _wait_seconds(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ApiError(
            422,
            "validation_error",
            f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS}",
            [{"name": "wait", "message": f"must be a number between 0 and {MAX_WAIT_SECONDS}"}],
        )
    return value


CANCEL_MESSAGES = {
    CancelOutcome.CANCELED: "the job was queued; it will not run",
    CancelOutcome.REQUESTED: "the job is running; its worker stops it within one decode step",
    CancelOutcome.ALREADY_FINAL: "the job had already finished; nothing was changed",
}


@api.post(f"{PREFIX}/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a job. Idempotent; says what it did."""
    _require_uuid(job_id)
    job, outcome = current_service().cancel(job_id, current_owner())
    response = jsonify({"outcome": outcome, "message": CANCEL_MESSAGES[outcome], "job": job_resource(job)})
    response.status_code = 202 if outcome == CancelOutcome.REQUESTED else 200
    return response


@api.get(f"{PREFIX}/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """Server-Sent Events: ``status``, ``token`` and a final ``done``; resumable with Last-Event-ID."""
    _require_uuid(job_id)
    svc = current_service()
    svc.get(job_id, current_owner())  # 404 (unknown, or another key's job) before the stream starts
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not _STREAM_ID.match(after):
        raise ApiError(422, "validation_error", "Last-Event-ID is not an event id of this stream",
                       [{"name": "Last-Event-ID", "message": "expected an id like 1700000000000-0"}])
    max_seconds = svc.settings.stream_max_seconds
    # Held until the response is closed: at its end, or when a write finds the client gone (within one
    # keep-alive), since the WSGI server closes the response either way.
    slot = watch(max_seconds + KEEPALIVE_SECONDS)

    feeds: JobFeeds = current_app.extensions["bloomq.feeds"]

    def generate() -> Iterator[str]:
        yield "retry: 1000\n\n"
        ends = time.monotonic() + max_seconds
        feed = feeds.join(job_id)  # every stream of this job in this process shares one Redis reader
        try:
            for batch in feed.follow(after, KEEPALIVE_SECONDS):
                yield "".join(_sse(event) for event in batch) if batch else ": keep-alive\n\n"
                if time.monotonic() >= ends:
                    # Close long streams so no watcher slot is held forever; EventSource reconnects
                    # with Last-Event-ID and picks up where this left off.
                    return
        finally:
            feeds.leave(feed)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    response = Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)
    response.call_on_close(slot.release)
    return response


def _sse(event: Event) -> str:
    event_id, name, data = event
    if name == "done":
        data = json.dumps(job_resource(Job.model_validate_json(data)), ensure_ascii=False)
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n"



@api.get(f"{PREFIX}/models")
def list_models() -> Response:
    """Configured models with queue depth and live worker count."""
    return jsonify({"models": current_service().models()})


@api.get(f"{PREFIX}/workers")
def list_workers() -> Response:
    """Live workers (their heartbeat is current). Operators (and everyone with API keys off) see where
    each runs; other keys see only its model, capacity, load and last heartbeat."""
    workers = current_service().live_workers()
    if is_operator():
        return jsonify({"workers": [w.model_dump(mode="json") for w in workers]})
    public = set(WorkerSummary.model_fields)
    return jsonify({"workers": [w.model_dump(mode="json", include=public) for w in workers]})


@api.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when this web process can serve: it started (its settings are valid) and Redis answers; else 503
    with reason codes. Workers are the back of the queue, not the front's readiness: while none serves a
    model (restarting, loading, scaled away) its jobs are accepted and wait, finished results are read,
    batches downloaded. The configured models with no live worker are listed, for information.

    The reasons are for anyone who can reach the probe: a code and a fixed message, never exception text
    (which can name hosts and addresses); the exception goes to the log."""
    svc = current_service()
    try:
        svc.store.redis.ping()
        served = {worker.model for worker in svc.live_workers()}
    except redis.RedisError as exc:
        log.warning("not ready: the job store (Redis) does not answer: %s", exc)
        return _not_ready("redis_unavailable", "the job store does not answer")
    waiting = [spec.name for spec in svc.registry.configured if spec.name not in served]
    return jsonify({"status": "ready", "reasons": [], "models_without_workers": waiting}), 200


def _not_ready(code: str, message: str) -> tuple[Response, int]:
    return jsonify({"status": "unavailable", "reasons": [{"code": code, "message": message}]}), 503


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics (shared by all web processes: the figures live in Redis); operators only."""
    require_operator()
    body, content_type = render_metrics(current_service(), request.headers.get("Accept"))
    return Response(body, content_type=content_type)  # a Content-Type as is: it names its charset already


@api.get(OPENAPI_PATH)
def openapi() -> Response:
    """The OpenAPI document of this API."""
    return jsonify(build_openapi(version()))


_STREAM_ID = re.compile(r"^\d{1,19}-\d{1,19}$")  # Redis stream ids: two 64-bit numbers


def _require_uuid(job_id: str) -> None:
    if not _is_uuid(job_id):
        raise ApiError(404, "not_found", f"no job {job_id!r}: job ids are UUIDs")


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False

"""The REST API (JSON): /api/v1/jobs, /api/v1/models, /healthz, /readyz."""

from __future__ import annotations

import uuid
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from pydantic import ValidationError

from jobs.schema import Job, JobRequest
from web.errors import ApiError, validation_error
from web.service import JobService

PREFIX = "/api/v1"

api = Blueprint("api", __name__)


def service() -> JobService:
    """The app's job service."""
    return current_app.extensions["bloomq"]


def job_resource(job: Job) -> dict[str, Any]:
    """A job as the API shows it, with its links."""
    return job.to_resource(
        self_url=url_for("api.get_job", job_id=job.id),
        page_url=url_for("views.job_page", job_id=job.id),
    )


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 415/400 ApiError saying what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "bad_request", "the body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


@api.post(f"{PREFIX}/jobs")
def submit_job() -> Response:
    """Queue a generation job; 202 with the job resource and its Location."""
    try:
        job_request = JobRequest.model_validate(read_json_object())
    except ValidationError as exc:
        raise validation_error(exc) from None
    job = service().submit(job_request)
    response = jsonify(job_resource(job))
    response.status_code = 202
    response.headers["Location"] = url_for("api.get_job", job_id=job.id)
    return response


MAX_WAIT_SECONDS = 60


@api.get(f"{PREFIX}/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """The job resource, or 404. ``?wait=N`` (N <= 60) answers once the job is final or N seconds pass."""
    if not _is_uuid(job_id):
        raise ApiError(404, "not_found", f"no job {job_id!r}: job ids are UUIDs")
    wait = _wait_seconds(request.args.get("wait"))
    svc = service()
    job = svc.get(job_id) if wait == 0 else svc.wait(job_id, wait)
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
            "wait must be a number of seconds",
            [{"name": "wait", "message": f"must be a number between 0 and {MAX_WAIT_SECONDS}"}],
        )
    return value


@api.get(f"{PREFIX}/models")
def list_models() -> Response:
    """Configured models with queue depth and live worker count."""
    return jsonify({"models": service().models()})


@api.get(f"{PREFIX}/workers")
def list_workers() -> Response:
    """Live workers (their heartbeat is current)."""
    return jsonify({"workers": [w.model_dump(mode="json") for w in service().live_workers()]})


@api.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when Redis answers, else 503 with the reason."""
    try:
        service().store.redis.ping()
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "reasons": [f"redis: {exc}"]}), 503
    return jsonify({"status": "ready", "reasons": []}), 200


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False

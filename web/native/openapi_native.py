"""The native job API in the OpenAPI document: its response models and its paths (/api/v1, /healthz,
/readyz)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from jobs.schema import API_JOBS_PATH, JobRequest, JobResource, JobStatus
from jobs.workers import WorkerInfo
from web.native.openapi_fragments import IDEMPOTENCY_KEY, json_content, ref, sse_json


class FieldError(BaseModel):
    """One invalid field."""

    name: str = Field(description="Dotted path of the field, e.g. parameters.top_p")
    message: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    fields: list[FieldError] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


class CancelResult(BaseModel):
    """What ``POST /jobs/{id}/cancel`` did."""

    outcome: str = Field(description="canceled | cancel_requested | already_final")
    message: str
    job: JobResource


class ModelInfo(BaseModel):
    name: str
    source: str
    default: bool
    queue: str
    queue_depth: int
    workers: int
    max_input_tokens: int
    max_total_tokens: int


class ModelList(BaseModel):
    models: list[ModelInfo]


class WorkerSummary(BaseModel):
    """A live worker as keys other than the operators' see it: no host, pid, names, paths or devices."""

    model: str
    batch_capacity: int = Field(description="How many jobs this worker runs at once.")
    jobs_running: int = Field(description="Jobs in its batch or waiting in its engine, at the last heartbeat.")
    last_seen: datetime


class WorkerList(BaseModel):
    workers: list[WorkerInfo | WorkerSummary] = Field(
        description="Everything each worker announces for operator keys (and with API keys off); a summary for other keys.")


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobResource]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null when there is none.")


class Health(BaseModel):
    status: str


class NotReadyReason(BaseModel):
    code: str = Field(description="redis_unavailable")
    message: str


class Readiness(BaseModel):
    status: str = Field(description="ready | unavailable")
    reasons: list[NotReadyReason]
    models_without_workers: list[str] = Field(
        default_factory=list, description="Configured models no live worker serves now (their jobs wait in the "
        "queue): information, not a reason to be unready.")


NATIVE_MODELS: list[tuple[type[BaseModel], str]] = [
    (JobRequest, "validation"),
    (JobResource, "serialization"),
    (ErrorBody, "serialization"),
    (CancelResult, "serialization"),
    (JobList, "serialization"),
    (ModelList, "serialization"),
    (WorkerList, "serialization"),
    (Health, "serialization"),
    (Readiness, "serialization"),
]

_ERRORS = {400: "Malformed request", 403: "Needs an operator key",
           404: "Unknown or expired job (or key)", 405: "Wrong method", 409: "Idempotency conflict",
           413: "Body too large", 415: "Body is not JSON", 422: "Invalid fields (each named)",
           429: "Too many queued jobs or requests", 503: "Redis unavailable"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], **json_content("ErrorBody")} for code in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}

JOB_EVENT = {
    "type": "object", "required": ["event", "data", "id"],
    "properties": {"event": {"enum": ["status", "token", "restart", "done"]},
                   "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
                   "data": sse_json({"type": "object"})},
    "if": {"properties": {"event": {"const": "done"}}},
    "then": {"properties": {"data": sse_json(ref("JobResource"))}},
}


def native_paths() -> dict[str, Any]:
    """The job API, the model and worker listings and the probes."""
    jobs = API_JOBS_PATH
    return {
        jobs: {
            "get": {
                "operationId": "listJobs",
                "summary": "The caller's jobs (with API keys off: those made without a key), newest first",
                "parameters": [
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                    {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "next_cursor of the previous page (or a job id of the listing)"},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "a job id of the listing (or a cursor): the page starts after it"},
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": [s.value for s in JobStatus]}},
                    {"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Operators: another key's jobs (its name or owner id)"},
                ],
                "responses": {"200": {"description": "A page of jobs", **json_content("JobList")},
                              **_errors(403, 404, 422, 503)},
            },
            "post": {
                "operationId": "submitJob",
                "summary": "Queue a generation job",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {"required": True, **json_content("JobRequest")},
                "responses": {
                    "202": {"description": "Queued", **json_content("JobResource")},
                    "200": {"description": "Already made with this Idempotency-Key", **json_content("JobResource")},
                    **_errors(400, 409, 413, 415, 422, 429, 503),
                },
            }
        },
        f"{jobs}/{{job_id}}": {
            "get": {
                "operationId": "getJob",
                "summary": "A job; with wait=N, once it is final or N seconds have passed",
                "parameters": [JOB_ID, {"name": "wait", "in": "query", "required": False,
                                        "schema": {"type": "number", "minimum": 0, "maximum": 60}}],
                "responses": {"200": {"description": "The job", **json_content("JobResource")},
                              **_errors(404, 422, 429, 503)},
            }
        },
        f"{jobs}/{{job_id}}/cancel": {
            "post": {
                "operationId": "cancelJob",
                "summary": "Cancel a job (idempotent)",
                "parameters": [JOB_ID],
                "responses": {
                    "200": {"description": "Canceled, or already final", **json_content("CancelResult")},
                    "202": {"description": "Running: its worker stops it", **json_content("CancelResult")},
                    **_errors(404, 503),
                },
            }
        },
        f"{jobs}/{{job_id}}/events": {
            "get": {
                "operationId": "jobEvents",
                "summary": "Server-Sent Events: status, token, done; resumable with Last-Event-ID",
                "parameters": [JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                        "schema": {"type": "string", "pattern": "^[0-9]{1,19}-[0-9]{1,19}$"}}],
                "responses": {"200": {"description": "The event stream",
                                      "content": {"text/event-stream": {"schema": JOB_EVENT}}},
                              **_errors(404, 422, 429, 503)},
            }
        },
        "/api/v1/models": {"get": {"operationId": "listModels", "summary": "Configured models",
                                   "responses": {"200": {"description": "Models", **json_content("ModelList")},
                                                 **_errors(503)}}},
        "/api/v1/workers": {"get": {"operationId": "listWorkers", "summary": "Live workers",
                                    "responses": {"200": {"description": "Workers", **json_content("WorkerList")},
                                                  **_errors(503)}}},
        "/api/v1/dashboard": {"get": {
            "operationId": "dashboard", "summary": "The live dashboard's figures (operators): per model and worker",
            "responses": {"200": {"description": "Figures", "content": {"application/json": {"schema": {
                "type": "object", "required": ["generated_at", "minutes", "models", "workers"],
                "properties": {"generated_at": {"type": "number"}, "minutes": {"type": "array"},
                               "models": {"type": "array", "items": {"type": "object"}},
                               "workers": {"type": "array", "items": {"type": "object"}}}}}}},
                          **_errors(403, 503)}}},
        "/healthz": {"get": {"operationId": "health", "summary": "The process is up",
                             "responses": {"200": {"description": "Up", **json_content("Health")}}}},
        "/readyz": {"get": {"operationId": "ready", "summary": "Ready to serve (Redis answers), or why not",
                            "responses": {"200": {"description": "Ready", **json_content("Readiness")},
                                          "503": {"description": "Not ready", **json_content("Readiness")}}}},
    }

"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests and shape
responses (no hand-kept copy of a schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from jobs.schema import API_JOBS_PATH, JobRequest, JobResource, JobStatus
from jobs.workers import WorkerInfo

REF = "#/components/schemas/{model}"


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
    code: str = Field(description="redis_unavailable | no_worker_for_default_model")
    message: str


class Readiness(BaseModel):
    status: str = Field(description="ready | unavailable")
    reasons: list[NotReadyReason]


_MODELS: list[tuple[type[BaseModel], str]] = [
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


def _json(model: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Malformed request", 404: "Unknown or expired job", 405: "Wrong method", 409: "Idempotency conflict",
            413: "Body too large", 415: "Body is not JSON", 422: "Invalid fields (each named)",
            429: "Too many queued jobs or requests", 503: "Redis unavailable"}
    return {str(code): {"description": text[code], **_json("ErrorBody")} for code in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _compatible_paths() -> dict[str, Any]:
    """The OpenAI- and TGI-compatible routes (their bodies from the models that validate them)."""
    stream = {"text/event-stream": {"schema": {"type": "string"}}}
    any_json = {"application/json": {"schema": {"type": "object"}}}

    def post(op: str, summary: str, body: str, streams: bool = True) -> dict[str, Any]:
        content = {**any_json, **stream} if streams else any_json
        return {"post": {"operationId": op, "summary": summary, "requestBody": {"required": True, **_json(body)},
                         "responses": {"200": {"description": "The result (or its event stream)", "content": content},
                                       "400": {"description": "Invalid request", "content": any_json},
                                       "404": {"description": "Unknown model", "content": any_json},
                                       "422": {"description": "Invalid parameters", "content": any_json},
                                       "429": {"description": "Too many requests", "content": any_json}}}}

    def get(op: str, summary: str) -> dict[str, Any]:
        return {"get": {"operationId": op, "summary": summary,
                        "responses": {"200": {"description": summary, "content": any_json},
                                      "404": {"description": "Unknown model", "content": any_json}}}}

    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "short name or full reference, e.g. bloom-560m or bigscience/bloom-560m"}]
    tgi = "/models/{name}"
    paths = {
        "/v1/models": get("openaiListModels", "OpenAI: models a job may use"),
        "/v1/completions": post("openaiCompletions", "OpenAI: text completions (one job per prompt and choice)",
                                "CompletionRequest"),
        "/v1/chat/completions": post("openaiChat", "OpenAI: chat, for models with a chat template", "ChatRequest"),
        tgi: post("hfInference", "Hugging Face Inference API / TGI '/': a list with one result", "TgiRequest"),
        f"{tgi}/generate": post("tgiGenerate", "TGI /generate", "TgiRequest", streams=False),
        f"{tgi}/generate_stream": post("tgiGenerateStream", "TGI /generate_stream: one event per token",
                                       "TgiRequest"),
        f"{tgi}/info": get("tgiInfo", "TGI /info"),
        f"{tgi}/health": get("tgiHealth", "TGI /health (503 when no worker serves the model)"),
    }
    for path, item in paths.items():
        if path.startswith(tgi):
            for operation in item.values():
                operation["parameters"] = name
    return paths


def build_openapi(version: str) -> dict[str, Any]:
    """The whole document."""
    from web.openai_schema import ChatRequest, CompletionRequest
    from web.tgi_api import TgiRequest  # (it imports the API, which imports this)

    models = [*_MODELS, (CompletionRequest, "validation"), (ChatRequest, "validation"), (TgiRequest, "validation")]
    _, top = models_json_schema(models, ref_template=REF)
    schemas = top.get("$defs", {})
    jobs = API_JOBS_PATH
    return {
        "openapi": "3.1.0",
        "info": {"title": "bloomq", "version": version, "description": "BLOOM text generation as a job queue."},
        "paths": {
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
                    ],
                    "responses": {"200": {"description": "A page of jobs", **_json("JobList")},
                                  **_errors(422, 503)},
                },
                "post": {
                    "operationId": "submitJob",
                    "summary": "Queue a generation job",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
                    "requestBody": {"required": True, **_json("JobRequest")},
                    "responses": {
                        "202": {"description": "Queued", **_json("JobResource")},
                        "200": {"description": "Already made with this Idempotency-Key", **_json("JobResource")},
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
                    "responses": {"200": {"description": "The job", **_json("JobResource")},
                                  **_errors(404, 422, 429, 503)},
                }
            },
            f"{jobs}/{{job_id}}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a job (idempotent)",
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": {"description": "Canceled, or already final", **_json("CancelResult")},
                        "202": {"description": "Running: its worker stops it", **_json("CancelResult")},
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
                                          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                                  **_errors(404, 422, 429, 503)},
                }
            },
            "/api/v1/models": {"get": {"operationId": "listModels", "summary": "Configured models",
                                       "responses": {"200": {"description": "Models", **_json("ModelList")},
                                                     **_errors(503)}}},
            "/api/v1/workers": {"get": {"operationId": "listWorkers", "summary": "Live workers",
                                        "responses": {"200": {"description": "Workers", **_json("WorkerList")},
                                                      **_errors(503)}}},
            "/healthz": {"get": {"operationId": "health", "summary": "The process is up",
                                 "responses": {"200": {"description": "Up", **_json("Health")}}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "Ready to serve, or why not",
                                "responses": {"200": {"description": "Ready", **_json("Readiness")},
                                              "503": {"description": "Not ready", **_json("Readiness")}}}},
            **_compatible_paths(),
        },
        "components": {"schemas": schemas},
    }

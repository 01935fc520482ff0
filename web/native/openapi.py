"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests and shape
responses (no hand-kept copy of a schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from jobs.batches import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    BatchError,
    BatchObject,
    FileObject,
)
from jobs.schema import API_JOBS_PATH, JobRequest, JobResource, JobStatus
from jobs.workers import WorkerInfo
from web.openai.schema import ChatRequest, CompletionRequest
from web.tgi.schema import TgiRequest

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


# -- the compatible APIs: OpenAI (/v1) and Hugging Face / TGI (/models/<name>) ----------------------------


class OpenAILineErrors(BaseModel):
    """A refused batch file's bad lines (the first 1000 of them)."""

    object: Literal["list"] = "list"
    data: list[BatchError]
    total: int = Field(description="How many lines were bad in all.")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | rate_limit_error | server_error")
    param: str | None = Field(description="The request parameter at fault, when one is.")
    code: str | None = Field(description="e.g. model_not_found, invalid_batch_file, timeout, unavailable")
    errors: OpenAILineErrors | None = Field(None, description="With code invalid_batch_file: every bad line.")


class OpenAIErrorBody(BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: OpenAIError


class TgiErrorBody(BaseModel):
    """Every error under /models, in TGI's shape."""

    error: str
    error_type: str = Field(description="validation | overloaded | generation | not_found | timeout | ...")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class OpenAIModelList(BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """``POST /v1/completions`` without ``stream``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool = Field(False, description="Absent from prefill tokens.")


class TgiDetails(BaseModel):
    finish_reason: str = Field(description="length | eos_token | stop_sequence")
    generated_tokens: int
    seed: int | None
    prefill: list[TgiToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] | None = Field(None, description="With top_n_tokens.")
    best_of_sequences: list[dict[str, Any]] | None = Field(None, description="With best_of > 1: the others.")


class TgiGenerated(BaseModel):
    """TGI's ``/generate`` answer (one item of the hosted route's list)."""

    generated_text: str
    details: TgiDetails | None = Field(None, description="With details: true.")


class TgiInfo(BaseModel):
    """TGI's ``/info`` (its fields; what bloomq cannot know is null), plus the live ``workers``."""

    model_id: str
    model_sha: str | None
    model_dtype: str | None
    model_device_type: str | None
    model_pipeline_tag: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    max_total_tokens: int
    max_batch_size: int | None
    max_batch_total_tokens: int | None
    max_waiting_tokens: int
    waiting_served_ratio: float
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    workers: int


class FileList(BaseModel):
    """A page of the caller's uploaded files."""

    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchList(BaseModel):
    """A page of the caller's batches, newest first."""

    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    input_file_id: str = Field(description="An uploaded file (purpose batch), one request per line.")
    endpoint: Literal["/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None = Field(
        None, max_length=MAX_METADATA_PAIRS, json_schema_extra={"propertyNames": {"maxLength": MAX_METADATA_KEY}})


class FileUpload(BaseModel):
    """``POST /v1/files`` (multipart/form-data)."""

    file: str = Field(json_schema_extra={"format": "binary"},
                      description="JSON Lines: {custom_id, method: POST, url: /v1/completions, body} per line")
    purpose: Literal["batch"]


_COMPATIBLE_MODELS: list[tuple[type[BaseModel], str]] = [
    (OpenAIErrorBody, "serialization"), (TgiErrorBody, "serialization"), (OpenAIModel, "serialization"),
    (OpenAIModelList, "serialization"), (Completion, "serialization"), (ChatCompletion, "serialization"),
    (TgiGenerated, "serialization"), (TgiInfo, "serialization"), (FileObject, "serialization"),
    (FileList, "serialization"), (FileDeleted, "serialization"), (BatchObject, "serialization"),
    (BatchList, "serialization"), (BatchCreate, "validation"), (FileUpload, "validation"),
]

_OPENAI_ERRORS = {400: "Invalid request (param names the field; a refused batch file lists its bad lines)",
                  404: "Unknown model, file or batch", 409: "Idempotency conflict", 413: "Body or file too large",
                  415: "Body is not JSON", 429: "Too many jobs, requests or open requests (Retry-After)",
                  500: "A job failed (its error)", 503: "Redis unavailable, or this process holds too many requests",
                  504: "The jobs did not finish within BLOOMQ_COMPAT_WAIT_SECONDS; they go on"}
_TGI_ERRORS = {400: "The body is not valid JSON or not an object", 404: "Unknown model",
               413: "Body too large", 415: "Body is not JSON", 422: "Invalid parameters",
               424: "The job failed", 429: "Too many jobs, requests or open requests (Retry-After)",
               503: "Redis unavailable, this process holds too many requests, or (health) no live worker",
               504: "The job did not finish within BLOOMQ_COMPAT_WAIT_SECONDS; it goes on"}


def _openai_errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _OPENAI_ERRORS[code], **_json("OpenAIErrorBody")} for code in codes}


def _tgi_errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _TGI_ERRORS[code], **_json("TgiErrorBody")} for code in codes}


def _sse_json(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data``: JSON matching ``schema``."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _ref(model: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=model)}


# Server-Sent Events, each event as {"event", "data", "id"?} (under OpenAPI 3.1, an event stream's schema
# describes one event).
JOB_EVENT = {
    "type": "object", "required": ["event", "data", "id"],
    "properties": {"event": {"enum": ["status", "token", "restart", "done"]},
                   "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
                   "data": _sse_json({"type": "object"})},
    "if": {"properties": {"event": {"const": "done"}}},
    "then": {"properties": {"data": _sse_json(_ref("JobResource"))}},
}
OPENAI_CHUNK = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {"object": {"enum": ["text_completion", "chat.completion.chunk"]},
                   "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}},
                   "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]}},
}
OPENAI_EVENT = {
    "type": "object", "required": ["data"],
    "description": "data: a chunk, or an error after the stream began, then [DONE]",
    "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
    "if": {"properties": {"data": {"const": "[DONE]"}}},
    "else": {"properties": {"data": _sse_json({"anyOf": [OPENAI_CHUNK, _ref("OpenAIErrorBody")]})}},
}
TGI_EVENT = {
    "type": "object", "required": ["data"],
    "description": "data: one token (the last with generated_text and details), or an error after the stream began",
    "properties": {"event": {"const": "message"}, "data": _sse_json({"anyOf": [
        {"type": "object", "required": ["index", "token", "generated_text", "details"],
         "properties": {"index": {"type": "integer"}, "token": _ref("TgiToken"),
                        "generated_text": {"type": ["string", "null"]}, "details": {"type": ["object", "null"]}}},
        _ref("TgiErrorBody")]})},
}


JOB_IDS_HEADER = {"X-Bloomq-Job-Id": {"description": "The ids of the jobs the request made, comma-separated",
                                      "schema": {"type": "string"}}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def _compatible_paths() -> dict[str, Any]:
    """The OpenAI- and TGI-compatible routes (their bodies from the models that validate them)."""
    idempotency = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255}}

    def openai_post(op: str, summary: str, body: str, answer: str) -> dict[str, Any]:
        content = {**_json(answer)["content"], "text/event-stream": {"schema": OPENAI_EVENT}}
        return {"post": {"operationId": op, "summary": summary, "parameters": [idempotency],
                         "requestBody": {"required": True, **_json(body)},
                         "responses": {"200": {"description": "The result, or its event stream with stream: true",
                                               "headers": JOB_IDS_HEADER, "content": content},
                                       **_openai_errors(400, 404, 409, 413, 415, 429, 500, 503, 504)}}}

    def tgi_post(op: str, summary: str, answer: dict[str, Any]) -> dict[str, Any]:
        return {"post": {"operationId": op, "summary": summary, "requestBody": {"required": True, **_json("TgiRequest")},
                         "responses": {"200": {"description": "The result", "headers": JOB_IDS_HEADER,
                                               "content": answer},
                                       **_tgi_errors(400, 404, 413, 415, 422, 424, 429, 503, 504)}}}

    generated = _json("TgiGenerated")["content"]
    stream = {"text/event-stream": {"schema": TGI_EVENT}}
    hosted = {"application/json": {"schema": {"type": "array", "items": _ref("TgiGenerated"), "minItems": 1,
                                              "maxItems": 1}}, **stream}
    tgi = "/models/{name}"
    paths: dict[str, Any] = {
        "/v1/models": {"get": {"operationId": "openaiListModels", "summary": "OpenAI: models a job may use",
                               "responses": {"200": {"description": "Models", **_json("OpenAIModelList")},
                                             **_openai_errors(503)}}},
        "/v1/models/{model}": {"get": {
            "operationId": "openaiGetModel", "summary": "OpenAI: one model",
            "parameters": [_path_param("model", "short name or full reference, e.g. bloom-560m")],
            "responses": {"200": {"description": "The model", **_json("OpenAIModel")}, **_openai_errors(404, 503)}}},
        "/v1/completions": openai_post("openaiCompletions", "OpenAI: text completions (one job per prompt and choice)",
                                       "CompletionRequest", "Completion"),
        "/v1/chat/completions": openai_post("openaiChat", "OpenAI: chat, for models with a chat template",
                                            "ChatRequest", "ChatCompletion"),
        tgi: tgi_post("hfInference", "Hugging Face Inference API / TGI '/': a list with one result, or the token "
                      "stream with stream: true", hosted),
        f"{tgi}/generate": tgi_post("tgiGenerate", "TGI /generate", generated),
        f"{tgi}/generate_stream": tgi_post("tgiGenerateStream", "TGI /generate_stream: one event per token", stream),
        f"{tgi}/info": {"get": {"operationId": "tgiInfo", "summary": "TGI /info",
                                "responses": {"200": {"description": "The model's limits", **_json("TgiInfo")},
                                              **_tgi_errors(404, 503)}}},
        f"{tgi}/health": {"get": {"operationId": "tgiHealth", "summary": "TGI /health (503 when no worker serves "
                                  "the model)",
                                  "responses": {"200": {"description": "A live worker serves the model",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object", "maxProperties": 0}}}},
                                                **_tgi_errors(404, 503)}}},
    }
    name = _path_param("name", "short name or full reference, e.g. bloom-560m or bigscience/bloom-560m")
    for path, item in paths.items():
        if path.startswith(tgi):
            for operation in item.values():
                operation["parameters"] = [name]
    return {**paths, **_batch_paths()}


def _batch_paths() -> dict[str, Any]:
    """The OpenAI Batch API: files and batches."""
    page = [{"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "the last id of the previous page"}]
    file_id = _path_param("file_id", "an uploaded file, or a batch's output or error file")
    batch_id = _path_param("batch_id", "a batch")
    jsonl = {"application/jsonl": {"schema": {"type": "string"}}}
    return {
        "/v1/files": {
            "post": {"operationId": "uploadFile", "summary": "Upload a batch input file (kept for the retention period)",
                     "requestBody": {"required": True, "content": {"multipart/form-data": {
                         "schema": {"$ref": REF.format(model="FileUpload")}}}},
                     "responses": {"200": {"description": "The file", **_json("FileObject")},
                                   **_openai_errors(400, 413, 429, 503)}},
            "get": {"operationId": "listFiles", "summary": "The caller's uploaded files",
                    "parameters": [*page,
                                   {"name": "order", "in": "query", "required": False,
                                    "schema": {"type": "string", "enum": ["desc", "asc"], "default": "desc"}},
                                   {"name": "purpose", "in": "query", "required": False,
                                    "schema": {"type": "string"}, "description": "only batch files exist"}],
                    "responses": {"200": {"description": "A page of files", **_json("FileList")},
                                  **_openai_errors(400, 503)}},
        },
        "/v1/files/{file_id}": {
            "get": {"operationId": "getFile", "summary": "A file's metadata",
                    "parameters": [file_id],
                    "responses": {"200": {"description": "The file", **_json("FileObject")},
                                  **_openai_errors(404, 503)}},
            "delete": {"operationId": "deleteFile", "summary": "Delete an uploaded file (a result file goes with "
                       "its batch)", "parameters": [file_id],
                       "responses": {"200": {"description": "Deleted", **_json("FileDeleted")},
                                     **_openai_errors(400, 404, 503)}},
        },
        "/v1/files/{file_id}/content": {
            "get": {"operationId": "fileContent", "summary": "A file's content; a result file has one JSON line per "
                    "request", "parameters": [file_id],
                    "responses": {"200": {"description": "The content", "content": jsonl},
                                  **_openai_errors(404, 503)}},
        },
        "/v1/batches": {
            "post": {"operationId": "createBatch", "summary": "Validate a file whole and queue every line as jobs, "
                     "or refuse it whole", "requestBody": {"required": True, **_json("BatchCreate")},
                     "responses": {"200": {"description": "The batch", **_json("BatchObject")},
                                   **_openai_errors(400, 404, 413, 429, 503)}},
            "get": {"operationId": "listBatches", "summary": "The caller's batches, newest first",
                    "parameters": page,
                    "responses": {"200": {"description": "A page of batches", **_json("BatchList")},
                                  **_openai_errors(400, 503)}},
        },
        "/v1/batches/{batch_id}": {
            "get": {"operationId": "getBatch", "summary": "A batch, brought up to date", "parameters": [batch_id],
                    "responses": {"200": {"description": "The batch", **_json("BatchObject")},
                                  **_openai_errors(404, 503)}},
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {"operationId": "cancelBatch", "summary": "Cancel a batch: queued lines never run, running ones "
                     "stop", "parameters": [batch_id],
                     "responses": {"200": {"description": "The batch", **_json("BatchObject")},
                                   **_openai_errors(404, 503)}},
        },
    }


def build_openapi(version: str) -> dict[str, Any]:
    """The whole document."""
    models = [*_MODELS, *_COMPATIBLE_MODELS, (CompletionRequest, "validation"), (ChatRequest, "validation"),
              (TgiRequest, "validation")]
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
                                          "content": {"text/event-stream": {"schema": JOB_EVENT}}},
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

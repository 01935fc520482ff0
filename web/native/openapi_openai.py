"""The OpenAI-compatible API (/v1) in the OpenAPI document: its bodies, errors, event stream and paths,
the Batch API's files and batches among them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from jobs.batches import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    BatchError,
    BatchObject,
    FileObject,
)
from web.native.openapi_fragments import IDEMPOTENCY_KEY, JOB_IDS_HEADER, json_content, path_param, ref, sse_json
from web.openai.schema import ChatRequest, CompletionRequest


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


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class OpenAIModelList(BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class CompletionUsage(BaseModel):
    """Tokens of a completion (the prompt counted once however many choices it has)."""

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
    usage: CompletionUsage


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
    usage: CompletionUsage


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


OPENAI_MODELS: list[tuple[type[BaseModel], str]] = [
    (OpenAIErrorBody, "serialization"), (OpenAIModel, "serialization"), (OpenAIModelList, "serialization"),
    (Completion, "serialization"), (ChatCompletion, "serialization"), (FileObject, "serialization"),
    (FileList, "serialization"), (FileDeleted, "serialization"), (BatchObject, "serialization"),
    (BatchList, "serialization"), (BatchCreate, "validation"), (FileUpload, "validation"),
    (CompletionRequest, "validation"), (ChatRequest, "validation"),
]

_ERRORS = {400: "Invalid request (param names the field; a refused batch file lists its bad lines)",
           404: "Unknown model, file or batch", 409: "Idempotency conflict", 413: "Body or file too large",
           415: "Body is not JSON", 429: "Too many jobs, requests or open requests (Retry-After)",
           500: "A job failed (its error)", 503: "Redis unavailable, or this process holds too many requests",
           504: "The jobs did not finish within BLOOMQ_COMPAT_WAIT_SECONDS; they go on"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], **json_content("OpenAIErrorBody")} for code in codes}


OPENAI_CHUNK = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {"object": {"enum": ["text_completion", "chat.completion.chunk"]},
                   "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}},
                   "usage": {"anyOf": [ref("CompletionUsage"), {"type": "null"}]}},
}
OPENAI_EVENT = {
    "type": "object", "required": ["data"],
    "description": "data: a chunk, or an error after the stream began, then [DONE]",
    "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
    "if": {"properties": {"data": {"const": "[DONE]"}}},
    "else": {"properties": {"data": sse_json({"anyOf": [OPENAI_CHUNK, ref("OpenAIErrorBody")]})}},
}


def _post(op: str, summary: str, body: str, answer: str) -> dict[str, Any]:
    content = {**json_content(answer)["content"], "text/event-stream": {"schema": OPENAI_EVENT}}
    return {"post": {"operationId": op, "summary": summary, "parameters": [IDEMPOTENCY_KEY],
                     "requestBody": {"required": True, **json_content(body)},
                     "responses": {"200": {"description": "The result, or its event stream with stream: true",
                                           "headers": JOB_IDS_HEADER, "content": content},
                                   **_errors(400, 404, 409, 413, 415, 429, 500, 503, 504)}}}


def openai_paths() -> dict[str, Any]:
    """The models, completions and chat (their bodies from the models that validate them)."""
    return {
        "/v1/models": {"get": {"operationId": "openaiListModels", "summary": "OpenAI: models a job may use",
                               "responses": {"200": {"description": "Models", **json_content("OpenAIModelList")},
                                             **_errors(503)}}},
        "/v1/models/{model}": {"get": {
            "operationId": "openaiGetModel", "summary": "OpenAI: one model",
            "parameters": [path_param("model", "short name or full reference, e.g. bloom-560m")],
            "responses": {"200": {"description": "The model", **json_content("OpenAIModel")}, **_errors(404, 503)}}},
        "/v1/completions": _post("openaiCompletions", "OpenAI: text completions (one job per prompt and choice)",
                                 "CompletionRequest", "Completion"),
        "/v1/chat/completions": _post("openaiChat", "OpenAI: chat, for models with a chat template",
                                      "ChatRequest", "ChatCompletion"),
    }


def batch_paths() -> dict[str, Any]:
    """The OpenAI Batch API: files and batches."""
    page = [{"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "the last id of the previous page"}]
    file_id = path_param("file_id", "an uploaded file, or a batch's output or error file")
    batch_id = path_param("batch_id", "a batch")
    jsonl = {"application/jsonl": {"schema": {"type": "string"}}}
    return {
        "/v1/files": {
            "post": {"operationId": "uploadFile",
                     "summary": "Upload a batch input file (kept for the retention period)",
                     "requestBody": {"required": True, "content": {"multipart/form-data": {
                         "schema": ref("FileUpload")}}},
                     "responses": {"200": {"description": "The file", **json_content("FileObject")},
                                   **_errors(400, 413, 429, 503)}},
            "get": {"operationId": "listFiles", "summary": "The caller's uploaded files",
                    "parameters": [*page,
                                   {"name": "order", "in": "query", "required": False,
                                    "schema": {"type": "string", "enum": ["desc", "asc"], "default": "desc"}},
                                   {"name": "purpose", "in": "query", "required": False,
                                    "schema": {"type": "string"}, "description": "only batch files exist"}],
                    "responses": {"200": {"description": "A page of files", **json_content("FileList")},
                                  **_errors(400, 503)}},
        },
        "/v1/files/{file_id}": {
            "get": {"operationId": "getFile", "summary": "A file's metadata",
                    "parameters": [file_id],
                    "responses": {"200": {"description": "The file", **json_content("FileObject")},
                                  **_errors(404, 503)}},
            "delete": {"operationId": "deleteFile", "summary": "Delete an uploaded file (a result file goes with "
                       "its batch)", "parameters": [file_id],
                       "responses": {"200": {"description": "Deleted", **json_content("FileDeleted")},
                                     **_errors(400, 404, 503)}},
        },
        "/v1/files/{file_id}/content": {
            "get": {"operationId": "fileContent", "summary": "A file's content; a result file has one JSON line per "
                    "request", "parameters": [file_id],
                    "responses": {"200": {"description": "The content", "content": jsonl},
                                  **_errors(404, 503)}},
        },
        "/v1/batches": {
            "post": {"operationId": "createBatch", "summary": "Validate a file whole and queue every line as jobs, "
                     "or refuse it whole", "requestBody": {"required": True, **json_content("BatchCreate")},
                     "responses": {"200": {"description": "The batch", **json_content("BatchObject")},
                                   **_errors(400, 404, 413, 429, 503)}},
            "get": {"operationId": "listBatches", "summary": "The caller's batches, newest first",
                    "parameters": page,
                    "responses": {"200": {"description": "A page of batches", **json_content("BatchList")},
                                  **_errors(400, 503)}},
        },
        "/v1/batches/{batch_id}": {
            "get": {"operationId": "getBatch", "summary": "A batch, brought up to date", "parameters": [batch_id],
                    "responses": {"200": {"description": "The batch", **json_content("BatchObject")},
                                  **_errors(404, 503)}},
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {"operationId": "cancelBatch", "summary": "Cancel a batch: queued lines never run, running ones "
                     "stop", "parameters": [batch_id],
                     "responses": {"200": {"description": "The batch", **json_content("BatchObject")},
                                   **_errors(404, 503)}},
        },
    }

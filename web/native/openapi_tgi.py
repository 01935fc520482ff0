"""The Hugging Face / TGI-compatible API (/models/<name>) in the OpenAPI document: its answers, errors,
token stream and paths."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from web.native.openapi_fragments import JOB_IDS_HEADER, json_content, path_param, ref, sse_json
from web.tgi.schema import TgiRequest


class TgiErrorBody(BaseModel):
    """Every error under /models, in TGI's shape."""

    error: str
    error_type: str = Field(description="validation | overloaded | generation | not_found | timeout | ...")


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


TGI_MODELS: list[tuple[type[BaseModel], str]] = [
    (TgiErrorBody, "serialization"), (TgiGenerated, "serialization"), (TgiInfo, "serialization"),
    (TgiRequest, "validation"),
]

_ERRORS = {400: "The body is not valid JSON or not an object", 404: "Unknown model",
           413: "Body too large", 415: "Body is not JSON", 422: "Invalid parameters",
           424: "The job failed", 429: "Too many jobs, requests or open requests (Retry-After)",
           503: "Redis unavailable, this process holds too many requests, or (health) no live worker",
           504: "The job did not finish within BLOOMQ_COMPAT_WAIT_SECONDS; it goes on"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], **json_content("TgiErrorBody")} for code in codes}


TGI_EVENT = {
    "type": "object", "required": ["data"],
    "description": "data: one token (the last with generated_text and details), or an error after the stream began",
    "properties": {"event": {"const": "message"}, "data": sse_json({"anyOf": [
        {"type": "object", "required": ["index", "token", "generated_text", "details"],
         "properties": {"index": {"type": "integer"}, "token": ref("TgiToken"),
                        "generated_text": {"type": ["string", "null"]}, "details": {"type": ["object", "null"]}}},
        ref("TgiErrorBody")]})},
}


# Before a response begins; a stream reports a failed job or the end of its wait as an event instead.
_REFUSALS = (400, 404, 413, 415, 422, 429, 503)


def _post(op: str, summary: str, answer: dict[str, Any], after: tuple[int, ...] = (424, 504)) -> dict[str, Any]:
    return {"post": {"operationId": op, "summary": summary,
                     "requestBody": {"required": True, **json_content("TgiRequest")},
                     "responses": {"200": {"description": "The result", "headers": JOB_IDS_HEADER,
                                           "content": answer},
                                   **_errors(*_REFUSALS, *after)}}}


def tgi_paths() -> dict[str, Any]:
    """The hosted Inference API route and TGI's own (their body from the model that validates it)."""
    generated = json_content("TgiGenerated")["content"]
    stream = {"text/event-stream": {"schema": TGI_EVENT}}
    hosted = {"application/json": {"schema": {"type": "array", "items": ref("TgiGenerated"), "minItems": 1,
                                              "maxItems": 1}}, **stream}
    tgi = "/models/{name}"
    paths: dict[str, Any] = {
        tgi: _post("hfInference", "Hugging Face Inference API / TGI '/': a list with one result, or the token "
                   "stream with stream: true", hosted),
        f"{tgi}/generate": _post("tgiGenerate", "TGI /generate", generated),
        f"{tgi}/generate_stream": _post("tgiGenerateStream", "TGI /generate_stream: one event per token", stream,
                                        after=()),
        f"{tgi}/info": {"get": {"operationId": "tgiInfo", "summary": "TGI /info",
                                "responses": {"200": {"description": "The model's limits", **json_content("TgiInfo")},
                                              **_errors(404, 503)}}},
        f"{tgi}/health": {"get": {"operationId": "tgiHealth", "summary": "TGI /health (503 when no worker serves "
                                  "the model)",
                                  "responses": {"200": {"description": "A live worker serves the model",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object", "maxProperties": 0}}}},
                                                **_errors(404, 503)}}},
    }
    name = path_param("name", "short name or full reference, e.g. bloom-560m or bigscience/bloom-560m")
    for item in paths.values():
        for operation in item.values():
            operation["parameters"] = [name]
    return paths

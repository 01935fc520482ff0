"""Keys and usage in the OpenAPI document: the keys API (operators only) and the usage report."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from jobs.accounts import KeyCreate, KeyInfo, KeyUpdate, NewKey
from web.native.openapi_fragments import json_content, path_param


class KeyList(BaseModel):
    keys: list[KeyInfo]


class Revoked(BaseModel):
    name: str
    revoked: bool


class UsageRow(BaseModel):
    """One group's figures: its model, day or key (as grouped), and the counts."""

    model: str | None = None
    day: str | None = None
    key: str | None = None
    prompt_tokens: int
    completion_tokens: int
    jobs: int


class UsageTotals(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    jobs: int


class Usage(BaseModel):
    """``GET /api/v1/usage``."""

    start: str
    end: str
    group_by: str
    key: str = Field(description="The owner id reported on, or 'all'")
    data: list[UsageRow]
    totals: UsageTotals


KEYS_MODELS: list[tuple[type[BaseModel], str]] = [
    (KeyCreate, "validation"), (KeyUpdate, "validation"), (NewKey, "serialization"), (KeyList, "serialization"),
    (KeyInfo, "serialization"), (Revoked, "serialization"), (Usage, "serialization"),
]

_ERRORS = {400: "Malformed request", 401: "No valid API key", 403: "Not an operator key",
           404: "No key of that name", 409: "The name is taken, or API keys are off", 413: "Body too large",
           415: "Body is not JSON", 422: "Invalid fields (each named)", 503: "Redis unavailable"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], **json_content("ErrorBody")} for code in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def accounts_paths() -> dict[str, Any]:
    """``/api/v1/keys``, ``/api/v1/keys/{name}`` and ``/api/v1/usage``."""
    name = path_param("name", "The key's name")
    day = {"type": "string", "format": "date"}
    return {
        "/api/v1/usage": {
            "get": {"operationId": "getUsage", "summary": "Tokens and jobs by model, day or key over UTC days",
                    "parameters": [
                        _query("start", day, "First UTC day (default: 29 days before end)"),
                        _query("end", day, "Last UTC day, included (default: today)"),
                        _query("group_by", {"type": "string", "enum": ["model", "day", "key"], "default": "model"},
                               "How the figures are grouped"),
                        _query("key", {"type": "string"}, "Operators: a key's name or owner id, or 'all'"),
                    ],
                    "responses": {"200": {"description": "The figures", **json_content("Usage")},
                                  **_errors(401, 403, 404, 422, 503)}},
        },
        "/api/v1/keys": {
            "get": {"operationId": "listKeys", "summary": "Every key made over the API (never secrets)",
                    "responses": {"200": {"description": "The keys", **json_content("KeyList")},
                                  **_errors(401, 403, 409, 503)}},
            "post": {"operationId": "createKey", "summary": "Make a key; its secret is in this answer only",
                     "requestBody": {"required": True, **json_content("KeyCreate")},
                     "responses": {"201": {"description": "Made", **json_content("NewKey")},
                                   **_errors(400, 401, 403, 409, 413, 415, 422, 503)}},
        },
        "/api/v1/keys/{name}": {
            "get": {"operationId": "getKey", "summary": "One key", "parameters": [name],
                    "responses": {"200": {"description": "The key", **json_content("KeyInfo")},
                                  **_errors(401, 403, 404, 409, 503)}},
            "patch": {"operationId": "updateKey", "summary": "Change a key's limits (null removes one)",
                      "parameters": [name], "requestBody": {"required": True, **json_content("KeyUpdate")},
                      "responses": {"200": {"description": "Changed", **json_content("KeyInfo")},
                                    **_errors(400, 401, 403, 404, 409, 413, 415, 422, 503)}},
            "delete": {"operationId": "revokeKey", "summary": "Revoke a key (its sessions end too)",
                       "parameters": [name],
                       "responses": {"200": {"description": "Revoked", **json_content("Revoked")},
                                     **_errors(401, 403, 404, 409, 503)}},
        },
    }

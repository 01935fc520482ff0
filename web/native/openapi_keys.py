"""The keys API in the OpenAPI document (operators only): its models and paths."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from jobs.accounts import KeyCreate, KeyInfo, KeyUpdate, NewKey
from web.native.openapi_fragments import json_content, path_param


class KeyList(BaseModel):
    keys: list[KeyInfo]


class Revoked(BaseModel):
    name: str
    revoked: bool


KEYS_MODELS: list[tuple[type[BaseModel], str]] = [
    (KeyCreate, "validation"), (KeyUpdate, "validation"), (NewKey, "serialization"), (KeyList, "serialization"),
    (KeyInfo, "serialization"), (Revoked, "serialization"),
]

_ERRORS = {400: "Malformed request", 401: "No valid API key", 403: "Not an operator key",
           404: "No key of that name", 409: "The name is taken, or API keys are off", 413: "Body too large",
           415: "Body is not JSON", 422: "Invalid fields (each named)", 503: "Redis unavailable"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _ERRORS[code], **json_content("ErrorBody")} for code in codes}


def keys_paths() -> dict[str, Any]:
    """``/api/v1/keys`` and ``/api/v1/keys/{name}``."""
    name = path_param("name", "The key's name")
    return {
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

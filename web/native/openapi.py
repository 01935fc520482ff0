"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests and shape
responses (no hand-kept copy of a schema): one module per surface holds its models and paths."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from web.http.auth import OPEN_API_PATHS
from web.native.openapi_accounts import KEYS_MODELS, accounts_paths
from web.native.openapi_fragments import REF
from web.native.openapi_native import NATIVE_MODELS, native_paths
from web.native.openapi_openai import OPENAI_MODELS, batch_paths, openai_paths
from web.native.openapi_tgi import TGI_MODELS, tgi_paths

OPENAPI_PATH = "/api/v1/openapi.json"


def build_openapi(version: str) -> dict[str, Any]:
    """The whole document."""
    _, top = models_json_schema([*NATIVE_MODELS, *KEYS_MODELS, *OPENAI_MODELS, *TGI_MODELS], ref_template=REF)
    this = {OPENAPI_PATH: {"get": {"operationId": "openapi", "summary": "This document (OpenAPI 3.1)",
                                   "responses": {"200": {"description": "The document", "content": {
                                       "application/json": {"schema": {"type": "object",
                                                                       "required": ["openapi", "paths"]}}}}}}}}
    paths = {**native_paths(), **accounts_paths(), **openai_paths(), **tgi_paths(), **batch_paths(), **this}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bloomq", "version": version, "description": "BLOOM text generation as a job queue."},
        "paths": _with_keys(paths),
        "components": {"schemas": top.get("$defs", {}),
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "An API key, when keys are on"}}},
    }


def _with_keys(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation but the open ones (probes, this document) takes an API key when keys are on (the
    empty requirement: none while they are off) and answers 401 without a valid one, in the shape of the
    operation's other errors."""
    for path, item in paths.items():
        if path in OPEN_API_PATHS:
            continue
        for operation in item.values():
            operation["security"] = [{"apiKey": []}, {}]
            responses = operation["responses"]
            if "401" not in responses:
                error = next(answer for code, answer in sorted(responses.items()) if int(code) >= 400)
                responses["401"] = {"description": "No valid API key (keys are on)",
                                    **{k: v for k, v in error.items() if k == "content"}}
    return paths

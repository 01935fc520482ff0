"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests and shape
responses (no hand-kept copy of a schema): one module per surface holds its models and paths."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from web.native.openapi_accounts import KEYS_MODELS, accounts_paths
from web.native.openapi_fragments import REF
from web.native.openapi_native import NATIVE_MODELS, native_paths
from web.native.openapi_openai import OPENAI_MODELS, batch_paths, openai_paths
from web.native.openapi_tgi import TGI_MODELS, tgi_paths


def build_openapi(version: str) -> dict[str, Any]:
    """The whole document."""
    _, top = models_json_schema([*NATIVE_MODELS, *KEYS_MODELS, *OPENAI_MODELS, *TGI_MODELS], ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "bloomq", "version": version, "description": "BLOOM text generation as a job queue."},
        "paths": {**native_paths(), **accounts_paths(), **openai_paths(), **tgi_paths(), **batch_paths()},
        "components": {"schemas": top.get("$defs", {})},
    }

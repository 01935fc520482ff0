"""mkdocs hook: the API reference's OpenAPI document, asked of a freshly built app as a client would.

The app is built with settings that reach no Redis (a session key is given, and the document's route reads
nothing from Redis), so the docs build needs no running stack. The document is written where the API
reference page reads it (docs/api/openapi.json, not committed) and is published with the site.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from config.settings import Settings
from web import create_app
from web.native.openapi import OPENAPI_PATH

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "api" / "openapi.json"


def served_document() -> dict[str, Any]:
    """What ``GET /api/v1/openapi.json`` answers."""
    logging.getLogger("web").setLevel(logging.ERROR)  # the app warns that keys are off: not the docs' business
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", secret_key="docs-build"))
    response = app.test_client().get(OPENAPI_PATH)
    if response.status_code != 200:
        raise RuntimeError(f"GET {OPENAPI_PATH} answered {response.status_code}")
    return response.get_json()


def on_pre_build(config: Any) -> None:
    document = json.dumps(served_document(), indent=2, ensure_ascii=False) + "\n"
    if not DOCUMENT.exists() or DOCUMENT.read_text() != document:
        DOCUMENT.write_text(document)

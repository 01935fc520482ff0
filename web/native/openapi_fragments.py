"""Pieces of the OpenAPI document that every surface's path table uses: references into the component
schemas, JSON and event-stream content, path parameters and the headers the APIs share."""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"

IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255}}

JOB_IDS_HEADER = {"X-Bloomq-Job-Id": {"description": "The ids of the jobs the request made, comma-separated",
                                      "schema": {"type": "string"}}}


def ref(model: str) -> dict[str, Any]:
    """A reference to a component schema."""
    return {"$ref": REF.format(model=model)}


def json_content(model: str) -> dict[str, Any]:
    """A JSON body matching a component schema."""
    return {"content": {"application/json": {"schema": ref(model)}}}


# Server-Sent Events are described one event at a time, as {"event", "data", "id"?}: under OpenAPI 3.1 an
# event stream's schema describes one event.
def sse_json(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data``: JSON matching ``schema``."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def path_param(name: str, description: str) -> dict[str, Any]:
    """A required string path parameter."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}

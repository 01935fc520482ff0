"""Request bodies and headers every JSON route reads the same way."""

from __future__ import annotations

from typing import Any

from flask import current_app, request

from web.http.errors import ApiError


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 415/400 ApiError saying what is wrong with it."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # Python's JSON reader recurses once per nesting level
        raise ApiError(400, "bad_request", "the body is nested too deeply to be a job request") from None
    if body is None:
        raise ApiError(400, "bad_request", "the body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


# The routes that take a batch file (the Batch API's upload, the form's): their bodies may be as large as
# BLOOMQ_MAX_BATCH_FILE_BYTES plus the form's own fields, not BLOOMQ_MAX_BODY_BYTES.
UPLOAD_ENDPOINTS = frozenset({"batches_api.upload_file", "views.submit_batch"})
UPLOAD_FIELDS_BYTES = 64 * 1024


def allow_batch_files() -> None:
    """``before_request`` of the app, before anything reads a form (CSRF protection does): raise the body
    limit on the upload routes."""
    if request.endpoint in UPLOAD_ENDPOINTS:
        settings = current_app.extensions["bloomq"].settings
        request.max_content_length = settings.max_batch_file_bytes + UPLOAD_FIELDS_BYTES


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key() -> str | None:
    """The request's ``Idempotency-Key`` header (None without one), or a 400 naming it when it is not 1 to
    255 characters: the same rule on every route that takes one."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        message = f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        raise ApiError(400, "bad_request", f"Idempotency-Key {message}", [{"name": "Idempotency-Key", "message": message}])
    return key

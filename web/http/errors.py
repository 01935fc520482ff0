"""Errors as JSON for the API (never an HTML trace) and as plain pages for people."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify, render_template, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, a machine-readable type and, where it applies, the fields at fault."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        fields: list[dict[str, str]] | None = None,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.fields = fields or []
        self.retry_after = retry_after
        self.extra = extra or {}  # more members of the error object (OpenAI's ``errors`` list of a batch file)

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "fields": self.fields}}


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """Pydantic errors as ``[{"name": "parameters.top_p", "message": ...}]``."""
    fields = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(part) for part in err["loc"])
        fields.append({"name": f"{prefix}{name}" if name else prefix.rstrip(".") or "body", "message": err["msg"]})
    return fields


def validation_error(exc: ValidationError) -> ApiError:
    """A 422 naming every invalid field."""
    fields = field_errors(exc)
    names = ", ".join(f["name"] for f in fields)
    return ApiError(422, "validation_error", f"invalid fields: {names}", fields)


def _wants_json() -> bool:
    return request.path.startswith(("/api/", "/v1/", "/models/")) or request.path in ("/healthz", "/readyz")


class ClientGone(Exception):
    """The client of a waiting request closed its connection (nobody is left to answer)."""


# -- the error shape of each surface: one formatter each ----------------------------------------------

def native_error(err: ApiError) -> tuple[dict[str, Any], int]:
    """bloomq's own shape: ``{"error": {"type", "message", "fields", ...}}`` (with any further members, e.g.
    the limit a quota error names)."""
    body = err.to_dict()
    body["error"].update(err.extra)
    return body, err.status


_OPENAI_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 429: "rate_limit_error"}


def openai_error(err: ApiError) -> tuple[dict[str, Any], int]:
    """OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``; a request OpenAI calls invalid
    is a 400 (never a 422)."""
    status = 400 if err.status == 422 else err.status
    kind = _OPENAI_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = err.fields[0]["name"] if err.fields else None
    return {"error": {"message": err.message, "type": kind, "param": param, "code": err.type, **err.extra}}, status


_TGI_KINDS = {422: "validation", 400: "validation", 413: "validation", 415: "validation", 429: "overloaded",
              401: "unauthorized", 404: "not_found", 424: "generation"}


def tgi_error(err: ApiError) -> tuple[dict[str, Any], int]:
    """TGI's shape: ``{"error": "...", "error_type": "validation" | "overloaded" | ...}``; an invalid field
    is a 422, as TGI answers."""
    status = 422 if err.status == 400 and err.fields else err.status
    return {"error": err.message, "error_type": _TGI_KINDS.get(err.status, err.type)}, status


def _formatter(path: str):  # noqa: ANN202 - one of the three above
    if path.startswith("/v1/"):
        return openai_error
    if path.startswith("/models/"):
        return tgi_error
    return native_error


def _json(err: ApiError) -> Response:
    body, status = _formatter(request.path)(err)
    response = jsonify(body)
    response.status_code = status
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="bloomq"'
    return response


def register_error_handlers(app: Flask) -> None:
    """JSON errors under /api, /v1 and /models, each in its surface's shape; friendly pages elsewhere."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Any:
        if _wants_json():
            return _json(err)
        return render_template("error.html", code=err.status, message=err.message), err.status

    @app.errorhandler(ValidationError)
    def _validation(err: ValidationError) -> Response:
        return _json(validation_error(err))

    @app.errorhandler(redis.RedisError)
    def _redis_down(err: redis.RedisError) -> tuple[Any, int]:
        log.error("Redis unavailable: %s", err)
        message = "the job store (Redis) is unavailable; try again shortly"
        if _wants_json():
            return _json(ApiError(503, "unavailable", message, retry_after=1)), 503  # a restart or failover: soon back
        return render_template("error.html", code=503, message=message), 503

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Any:
        type_ = (err.name or "error").lower().replace(" ", "_")
        if _wants_json():
            response = _json(ApiError(err.code or 500, type_, err.description or err.name))
            if err.code == 405 and err.valid_methods:  # type: ignore[attr-defined]
                response.headers["Allow"] = ", ".join(err.valid_methods)  # type: ignore[attr-defined]
            return response
        return render_template("error.html", code=err.code, message=err.description), err.code

    @app.errorhandler(ClientGone)
    def _client_gone(err: ClientGone) -> tuple[str, int]:
        log.info("%s %s: %s", request.method, request.path, err)
        return "", 499  # (nginx's "client closed request": nobody reads it)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        message = "internal error; the server log has the details"
        if _wants_json():
            return _json(ApiError(500, "internal_error", message))
        return render_template("error.html", code=500, message=message), 500

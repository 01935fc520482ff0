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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.fields = fields or []
        self.retry_after = retry_after

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


def _body(err: ApiError) -> dict[str, Any]:
    """The error in the shape the path's clients expect: OpenAI's under /v1, TGI's under /models."""
    if request.path.startswith("/v1/"):
        param = err.fields[0]["name"] if err.fields else None
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        return {"error": {"message": err.message, "type": kind, "param": param, "code": err.type}}
    if request.path.startswith("/models/"):
        return {"error": err.message, "error_type": err.type}
    return err.to_dict()


def _json(err: ApiError) -> Response:
    response = jsonify(_body(err))
    response.status_code = err.status
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    if err.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="bloomq"'
    return response


def register_error_handlers(app: Flask) -> None:
    """JSON errors under /api, friendly pages elsewhere."""

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

"""The keys API (operators only): ``/api/v1/keys`` to make, list, change and revoke API keys. (A Redis
outage is answered 503 by the app's error handler.)"""

from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, jsonify, url_for
from pydantic import ValidationError

from jobs.accounts import NAME_PATTERN, KeyBook, KeyCreate, KeyUpdate
from web.http.auth import api_keys, authenticate_api, require_operator
from web.http.bodies import read_json_object
from web.http.errors import ApiError, validation_error

KEYS_PATH = "/api/v1/keys"
_NAME = re.compile(NAME_PATTERN)

keys_api = Blueprint("keys", __name__)
keys_api.before_request(authenticate_api)


@keys_api.before_request
def _operators_only() -> None:
    if api_keys() is None:
        raise ApiError(409, "auth_off", "API keys are off: set BLOOMQ_OPERATOR_KEYS to turn them on and manage "
                                        "keys with an operator key")
    require_operator()


def _book() -> KeyBook:
    return current_app.extensions["bloomq.key_book"]


def _no_such_key(name: str) -> ApiError:
    return ApiError(404, "not_found", f"no key named {name!r}")


def _known_name(name: str) -> str:
    if not _NAME.match(name):
        raise _no_such_key(name)
    return name


@keys_api.post(KEYS_PATH)
def create_key() -> tuple[Response, int]:
    """A new key; its secret is in this answer only."""
    try:
        request = KeyCreate.model_validate(read_json_object())
    except ValidationError as exc:
        raise validation_error(exc) from None
    made = _book().create(request)
    if made is None:
        raise ApiError(409, "conflict", f"a key named {request.name!r} exists",
                       [{"name": "name", "message": "is taken"}])
    response = jsonify(made.model_dump(mode="json"))
    response.headers["Location"] = url_for("keys.get_key", name=made.name)
    return response, 201


@keys_api.get(KEYS_PATH)
def list_keys() -> Response:
    """Every key made over the API: names, roles, limits, when made and last used; never secrets."""
    return jsonify({"keys": [key.model_dump(mode="json") for key in _book().all()]})


@keys_api.get(f"{KEYS_PATH}/<name>")
def get_key(name: str) -> Response:
    """One key."""
    name = _known_name(name)
    found = _book().named(name)
    if found is None:
        raise _no_such_key(name)
    return jsonify(found.model_dump(mode="json"))


@keys_api.patch(f"{KEYS_PATH}/<name>")
def update_key(name: str) -> Response:
    """Change a key's limits (a null removes one)."""
    name = _known_name(name)
    try:
        changes = KeyUpdate.model_validate(read_json_object())
    except ValidationError as exc:
        raise validation_error(exc) from None
    updated = _book().update(name, changes)
    if updated is None:
        raise _no_such_key(name)
    return jsonify(updated.model_dump(mode="json"))


@keys_api.delete(f"{KEYS_PATH}/<name>")
def revoke_key(name: str) -> Response:
    """Revoke a key: its next request, and its browser sessions', are refused."""
    name = _known_name(name)
    if not _book().revoke(name):
        raise _no_such_key(name)
    return jsonify({"name": name, "revoked": True})


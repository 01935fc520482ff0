"""Optional API keys: Bearer tokens for programs, a session (with CSRF protection) for the web form.

Keys come from ``BLOOMQ_API_KEYS`` (comma-separated) and/or ``BLOOMQ_API_KEYS_FILE`` (one per line;
``sha256:<hex>`` lines hold a key's hash instead of the key). Only SHA-256 hashes are kept in memory.
A job belongs to the key that made it (its ``owner`` is a short id derived from the hash): another key
gets ``404`` for it. With no keys configured, auth is off, and the log and the pages say so.

``BLOOMQ_OPERATOR_KEYS`` (keys or ``sha256:<hex>``, comma-separated) names the operators: they are API
keys too, and may also see operational details (hosts, pids, model paths). With auth off everyone is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, g, redirect, request, session, url_for
from flask_wtf.csrf import CSRFProtect

from config.settings import Settings
from web.http.errors import ApiError

log = logging.getLogger(__name__)

OPEN_API_PATHS = ("/healthz", "/readyz", "/api/v1/openapi.json")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_id(digest: str) -> str:
    """The short, non-secret id of a key: what jobs record as their owner."""
    return "key:" + digest[:12]


@dataclass(frozen=True)
class ApiKeys:
    """The SHA-256 hashes of the accepted keys, and the owner ids of the operators among them."""

    hashes: frozenset[str]
    operators: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The configured keys, or None when auth is off."""
        hashes = {key_hash(key) for key in settings.api_keys}
        operators = {_entry_hash(key) for key in settings.operator_keys}
        hashes |= operators
        if settings.api_keys_file:
            for line in Path(settings.api_keys_file).read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                hashes.add(_entry_hash(line))
        if not hashes:
            return None
        return cls(frozenset(hashes), frozenset(owner_id(digest) for digest in operators))

    def identify(self, key: str) -> str | None:
        """The owner id of ``key``, or None when it is not a valid key."""
        digest = key_hash(key)
        for known in self.hashes:
            if hmac.compare_digest(known, digest):
                return owner_id(digest)
        return None


def _entry_hash(entry: str) -> str:
    """The hash a configured key entry stands for: ``sha256:<hex>`` as given, or the key's hash."""
    return entry.removeprefix("sha256:").lower() if entry.startswith("sha256:") else key_hash(entry)


csrf = CSRFProtect()


def current_owner() -> str | None:
    """Who this request acts for (None with auth off)."""
    return g.get("owner")


def is_operator() -> bool:
    """Whether this request may see operational details: an operator key (or its signed-in session), or
    anyone while API keys are off (the single-user default)."""
    keys = _keys()
    return keys is None or (g.get("owner") is not None and g.owner in keys.operators)


def _keys() -> ApiKeys | None:
    return current_app.extensions["bloomq.keys"]


def init_auth(app: Flask, settings: Settings) -> None:
    """Wire API keys, sessions and CSRF protection into ``app``."""
    keys = ApiKeys.from_settings(settings)
    app.extensions["bloomq.keys"] = keys
    app.config["WTF_CSRF_TIME_LIMIT"] = None  # tokens live as long as the session
    csrf.init_app(app)
    if keys is None:
        log.warning("API keys are off: anyone who can reach this server can submit, read and cancel jobs "
                    "(set BLOOMQ_API_KEYS or BLOOMQ_API_KEYS_FILE)")

    @app.context_processor
    def _auth_state() -> dict[str, object]:
        return {"auth_enabled": _keys() is not None, "signed_in": bool(session.get("owner"))}


def authenticate_api() -> None:
    """``before_request`` of the API: a Bearer key, or the web session (with its CSRF token on writes)."""
    keys = _keys()
    if keys is None or request.path in OPEN_API_PATHS:
        g.owner = None
        return
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        owner = keys.identify(header.removeprefix("Bearer ").strip())
    else:
        owner = session.get("owner")
        if owner and request.method not in SAFE_METHODS:
            csrf.protect()  # a browser session writing through the API must prove it is our page
    if not owner:
        raise ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'")
    g.owner = owner


def authenticate_page():  # noqa: ANN201 - a redirect or None
    """``before_request`` of the pages: with auth on, a session is needed (sign in with a key)."""
    keys = _keys()
    g.owner = session.get("owner") if keys is not None else None
    if keys is not None and not g.owner and request.endpoint not in ("views.login", "static"):
        return redirect(url_for("views.login", next=request.path))
    return None

"""API keys: Bearer tokens for programs, a session (with CSRF protection) for the web form.

Keys come from the environment and from Redis. ``BLOOMQ_API_KEYS`` (comma-separated) and
``BLOOMQ_API_KEYS_FILE`` (one per line; ``sha256:<hex>`` lines hold a key's hash instead of the key) are
user keys, ``BLOOMQ_OPERATOR_KEYS`` operator keys; any of them turns auth on. Operators make more keys
at run time over ``/api/v1/keys`` (``jobs.accounts``): those live in Redis, are looked up on every
request, and a revoked one is refused at its next request in every web process, browser sessions
included (a session holds the hash of its key and is checked again each time). Only hashes are kept.

A job belongs to the key that made it (its ``owner``): another key gets ``404`` for it. Operators may
also see operational details (hosts, pids, model paths, metrics) and manage keys. With no keys
configured, auth is off, and the log and the pages say so.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from flask import Flask, current_app, g, redirect, request, session, url_for
from flask_wtf.csrf import CSRFProtect

from config.settings import Settings
from jobs.accounts import KeyBook, KeyInfo, key_hash, owner_id
from jobs.usage import ANONYMOUS
from web.http.errors import ApiError

log = logging.getLogger(__name__)

OPEN_API_PATHS = ("/healthz", "/readyz", "/api/v1/openapi.json")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SESSION_LIFETIME = timedelta(hours=12)


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: the key's owner id, whether it is an operator's, and its record when it
    was made over the API (None for a key from the environment)."""

    owner: str
    digest: str
    operator: bool
    key: KeyInfo | None = None


@dataclass(frozen=True)
class ApiKeys:
    """The keys from the environment (SHA-256 hashes; which are the operators'), over the keys in Redis."""

    hashes: frozenset[str]
    operators: frozenset[str]
    book: KeyBook

    @classmethod
    def from_settings(cls, settings: Settings, book: KeyBook) -> ApiKeys | None:
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
        return cls(frozenset(hashes), frozenset(operators), book)

    def identify(self, secret: str) -> Caller | None:
        """Who ``secret`` is, or None when it is not a valid key."""
        return self.recognize(key_hash(secret)) if secret else None

    def recognize(self, digest: str) -> Caller | None:
        """Who the key with this hash is, or None (unknown, or revoked since)."""
        for known in self.hashes:
            if hmac.compare_digest(known, digest):
                return Caller(owner_id(digest), digest, digest in self.operators)
        key = self.book.find(digest)  # a Redis outage: 503, from the app's error handler
        if key is None:
            return None
        self.book.touch(digest)
        return Caller(key.owner, digest, key.role == "operator", key)


def _entry_hash(entry: str) -> str:
    """The hash a configured key entry stands for: ``sha256:<hex>`` as given, or the key's hash."""
    return entry.removeprefix("sha256:").lower() if entry.startswith("sha256:") else key_hash(entry)


csrf = CSRFProtect()


def current_owner() -> str | None:
    """Who this request acts for (None with auth off)."""
    return g.get("owner")


def current_caller() -> Caller | None:
    """The key this request came with (None with auth off)."""
    return g.get("caller")


def auth_enabled() -> bool:
    return api_keys() is not None


def is_operator() -> bool:
    """Whether this request may see operational details: an operator key (or its signed-in session), or
    anyone while API keys are off (the single-user default)."""
    caller = current_caller()
    return not auth_enabled() or (caller is not None and caller.operator)


def require_operator() -> None:
    """A 403 unless the caller is an operator (with auth on, after authentication)."""
    if not is_operator():
        raise ApiError(403, "forbidden", "this needs an operator key")


def owner_of(wanted: str, field: str = "key") -> str:
    """The owner id an operator names, by a key's name or its owner id (``key:…``; ``-``: the jobs made
    with keys off); a 403 for other callers, a 404 naming ``field`` for an unknown key."""
    if not is_operator():
        raise ApiError(403, "forbidden", "only operator keys may read other keys' jobs and usage",
                       [{"name": field, "message": "needs an operator key"}])
    if wanted.startswith("key:") or wanted == ANONYMOUS:
        return wanted
    book: KeyBook = current_app.extensions["bloomq.key_book"]
    found = book.named(wanted)
    if found is None:
        raise ApiError(404, "not_found", f"no key named {wanted!r}", [{"name": field, "message": "unknown key"}])
    return found.owner


def api_keys() -> ApiKeys | None:
    return current_app.extensions["bloomq.keys"]


def init_auth(app: Flask, settings: Settings, book: KeyBook) -> None:
    """Wire API keys, sessions and CSRF protection into ``app``."""
    keys = ApiKeys.from_settings(settings, book)
    app.extensions["bloomq.keys"] = keys
    app.config["WTF_CSRF_TIME_LIMIT"] = None  # tokens live as long as the session
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
                      PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME)
    csrf.init_app(app)
    if keys is None:
        log.warning("API keys are off: anyone who can reach this server can submit, read and cancel jobs "
                    "(set BLOOMQ_API_KEYS, BLOOMQ_API_KEYS_FILE or BLOOMQ_OPERATOR_KEYS)")

    @app.context_processor
    def _auth_state() -> dict[str, object]:
        return {"auth_enabled": api_keys() is not None, "signed_in": bool(session.get("key"))}


def sign_in(caller: Caller) -> None:
    """Start a browser session for ``caller`` (it holds the key's hash, checked again on every request)."""
    session.clear()
    session.permanent = True  # a bounded lifetime (SESSION_LIFETIME), not "until the browser closes"
    session["key"] = caller.digest


def _session_caller(keys: ApiKeys) -> Caller | None:
    digest = session.get("key")
    caller = keys.recognize(digest) if isinstance(digest, str) else None
    if caller is None and digest is not None:
        session.clear()  # revoked (or from an older release): the session ends
    return caller


def authenticate_api() -> None:
    """``before_request`` of the API: a Bearer key, or the web session (with its CSRF token on writes)."""
    keys = api_keys()
    if keys is None or request.path in OPEN_API_PATHS:
        g.owner = g.caller = None
        return
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        caller = keys.identify(header.removeprefix("Bearer ").strip())
    else:
        caller = _session_caller(keys)
        if caller is not None and request.method not in SAFE_METHODS:
            csrf.protect()  # a browser session writing through the API must prove it is our page
    if caller is None:
        raise ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'")
    g.caller, g.owner = caller, caller.owner


def authenticate_page():  # noqa: ANN201 - a redirect or None
    """``before_request`` of the pages: with auth on, a session is needed (sign in with a key)."""
    keys = api_keys()
    caller = _session_caller(keys) if keys is not None else None
    g.caller, g.owner = caller, (caller.owner if caller else None)
    if keys is not None and caller is None and request.endpoint not in ("views.login", "static"):
        return redirect(url_for("views.login", next=request.path))
    return None

"""Per-key rate limiting of submissions (flask-limiter, counters in Redis so every web process and
machine shares them). Off unless ``BLOOMQ_RATE_LIMIT`` is set, e.g. ``60/minute;1000/day``."""

from __future__ import annotations

from flask import current_app, g, request
from flask_limiter import Limiter


def who() -> str:
    """The API key's owner id, or the client address when auth is off: whom per-key limits count."""
    return g.get("owner") or request.remote_addr or "unknown"


def _submission_limit() -> str:
    return current_app.extensions["bloomq"].settings.rate_limit


def _limits_off() -> bool:
    return not current_app.extensions["bloomq"].settings.rate_limit


limiter = Limiter(key_func=who, headers_enabled=True)
limit_submissions = limiter.limit(_submission_limit, exempt_when=_limits_off)

"""Per-key rate limiting of the work a key creates (counters in Redis, through flask-limiter's storage, so
every web process and machine shares them). Off unless ``BLOOMQ_RATE_LIMIT`` is set, e.g.
``60/minute;1000/day``.

The limit counts jobs, not requests: every route that creates jobs (the job API, the form, the OpenAI
and TGI routes, batches) charges the number of jobs it is about to create, after the request was
validated and before anything is written, and a charge that does not fit is refused whole (429 with
Retry-After) with nothing counted. A file upload counts as one.
"""

from __future__ import annotations

import math
import time

from flask import current_app, g, request
from flask_limiter import Limiter
from limits import parse_many

from web.http.errors import ApiError

SCOPE = "jobs"  # the counters' name in the limiter's storage


def who() -> str:
    """The API key's owner id, or the client address when auth is off: whom per-key limits count."""
    return g.get("owner") or request.remote_addr or "unknown"


limiter = Limiter(key_func=who, headers_enabled=False)


def charge(jobs: int) -> None:
    """Count ``jobs`` against the caller's rate limit, or raise a 429 ApiError (nothing counted) when
    they do not fit in every window now."""
    spec = current_app.extensions["bloomq"].settings.rate_limit
    if not spec or jobs <= 0:
        return
    strategy, key = limiter.limiter, who()
    items = parse_many(spec)
    for item in items:
        if jobs > item.amount:
            raise ApiError(429, "rate_limited", f"this request makes {jobs} jobs; the rate limit allows at most "
                           f"{item.amount} per {item.get_expiry()} s (BLOOMQ_RATE_LIMIT={spec}): split it",
                           retry_after=item.get_expiry())
        if not strategy.test(item, SCOPE, key, cost=jobs):
            reset = strategy.get_window_stats(item, SCOPE, key).reset_time
            raise ApiError(429, "rate_limited", f"rate limit reached ({item.amount} jobs per {item.get_expiry()} s); "
                           f"no room for {jobs} more now", retry_after=max(1, math.ceil(reset - time.time())))
    for item in items:
        strategy.hit(item, SCOPE, key, cost=jobs)

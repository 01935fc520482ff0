"""Per-key limits of the work a key creates: the rate limit, and the quotas of keys made over the API.

Rate limiting (counters in Redis, through flask-limiter's storage, so
every web process and machine shares them). Off unless ``BLOOMQ_RATE_LIMIT`` is set, e.g.
``60/minute;1000/day``.

The limit counts jobs, not requests: every route that creates jobs (the job API, the form, the OpenAI
and TGI routes, batches) charges the number of jobs it is about to create, after the request was
validated and before anything is written, and a charge that does not fit is refused whole (429 with
Retry-After) with nothing counted. A file upload counts as one.

Quotas (``jobs.quotas``): a key made over the API with ``tokens_per_day`` or ``max_active_jobs`` holds each
job's token budget and an active slot at submission, all of a request's jobs or none (429
``quota_exceeded`` naming the limit, with Retry-After); its ``file_bytes`` caps what its files hold.
"""

from __future__ import annotations

import math
import time

from flask import current_app, g, request
from flask_limiter import Limiter
from limits import parse_many

from jobs.quotas import QuotaExceeded, Quotas
from jobs.schema import Job
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


def hold_quota(jobs: list[Job]) -> list[Job]:
    """``jobs`` holding the caller's quota (see ``jobs.quotas``), or a 429 ``quota_exceeded`` ApiError
    naming the limit, with nothing held. Keys from the environment have no quotas."""
    caller = g.get("caller")
    if caller is None or caller.key is None:
        return jobs
    key = caller.key
    try:
        return quotas().hold(caller.owner, jobs, key.tokens_per_day, key.max_active_jobs)
    except QuotaExceeded as exc:
        raise ApiError(429, "quota_exceeded", str(exc), retry_after=exc.retry_after,
                       extra={"limit": exc.limit, "limit_value": exc.value, "in_use": exc.in_use}) from None


def file_bytes_limit() -> int:
    """What the caller's stored files may hold: its key's ``file_bytes``, within the server's limit."""
    limit = current_app.extensions["bloomq"].settings.max_file_bytes_per_key
    caller = g.get("caller")
    if caller is not None and caller.key is not None and caller.key.file_bytes is not None:
        return min(limit, caller.key.file_bytes)
    return limit


def quotas() -> Quotas:
    return current_app.extensions["bloomq"].quotas

"""``GET /api/v1/usage``: tokens used, by model, day or key, over a range of UTC days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from flask import Blueprint, Response, jsonify, request

from jobs.usage import ANONYMOUS, KINDS, read_usage
from web.http.auth import authenticate_api, current_owner, is_operator, owner_of
from web.http.context import current_service
from web.http.errors import ApiError

USAGE_PATH = "/api/v1/usage"
MAX_DAYS = 366
GROUPS = ("model", "day", "key")

usage_api = Blueprint("usage", __name__)
usage_api.before_request(authenticate_api)


def _day(name: str, default: date) -> date:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "validation_error", f"{name} must be a UTC day, YYYY-MM-DD",
                       [{"name": name, "message": "must be a day, YYYY-MM-DD"}]) from None


def _owner() -> str | None:
    """Whose usage: the caller's own; an operator may name a key (its name or owner id) or ``all``."""
    wanted = request.args.get("key")
    if wanted is None:
        return current_owner() or ANONYMOUS
    if wanted == "all" and is_operator():
        return None
    return owner_of(wanted)


@usage_api.get(USAGE_PATH)
def usage() -> Response:
    """Prompt and completion tokens and jobs, from ``start`` to ``end`` (UTC days, both included; default:
    the last 30 days), grouped by ``model`` (default), ``day`` or ``key`` (operators)."""
    today = datetime.now(UTC).date()
    end = _day("end", today)
    start = _day("start", end - timedelta(days=min(29, (end - date.min).days)))
    if start > end or (end - start).days >= MAX_DAYS:
        raise ApiError(422, "validation_error", f"start must be on or before end, at most {MAX_DAYS} days apart",
                       [{"name": "start", "message": f"on or before end, within {MAX_DAYS} days of it"}])
    group_by = request.args.get("group_by", "model")
    if group_by not in GROUPS:
        raise ApiError(422, "validation_error", f"group_by must be one of {', '.join(GROUPS)}",
                       [{"name": "group_by", "message": f"one of {', '.join(GROUPS)}"}])
    owner = _owner()
    rows = read_usage(current_service().store.redis, start, end, owner, group_by)
    totals = {kind: sum(row[kind] for row in rows) for kind in KINDS}
    return jsonify({"start": start.isoformat(), "end": end.isoformat(), "group_by": group_by,
                    "key": owner if owner is not None else "all", "data": rows, "totals": totals})

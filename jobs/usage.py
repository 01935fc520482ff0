"""Usage accounting: every finished job's prompt and completion tokens, by key, model, UTC day and hour,
written in the job's own final transaction (so a job is counted once, whichever process finished it and
whatever crashed), and read back summed over days."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import redis

from jobs.connection import as_text
from jobs.keys import USAGE_TOTALS_KEY, usage_key
from jobs.schema import Job

KEPT_SECONDS = 400 * 24 * 3600  # a day's figures are kept for 400 days
ANONYMOUS = "-"  # the owner of jobs made with API keys off
KINDS = ("prompt_tokens", "completion_tokens", "jobs")


def used_tokens(job: Job) -> tuple[int, int]:
    """The prompt and completion tokens a final job used (0, 0 when it never ran)."""
    output = job.output
    if output is None:
        return 0, 0
    return output.prompt_tokens or 0, output.generated_tokens


def stage_usage(pipe: Any, job: Job) -> None:
    """Count a final job on its finishing day's figures (on the job's final transaction)."""
    finished = job.finished_at
    if finished is None:
        return
    prompt, completion = used_tokens(job)
    key = usage_key(finished.strftime("%Y-%m-%d"))
    prefix = f"{job.owner or ANONYMOUS}|{job.model}|{finished.hour:02d}|"
    total = f"{job.owner or ANONYMOUS}|{job.model}|"
    for kind, amount in zip(KINDS, (prompt, completion, 1), strict=True):
        if amount:
            pipe.hincrby(key, prefix + kind, amount)
            pipe.hincrby(USAGE_TOTALS_KEY, total + kind, amount)
    pipe.expire(key, KEPT_SECONDS)


def _figures(client: redis.Redis, start: date, end: date, owner: str | None
             ) -> Iterator[tuple[str, str, str, str, int]]:
    """(day, owner, model, kind, amount) of every figure kept from ``start`` to ``end`` (UTC days, both
    included), of ``owner`` (None: every key)."""
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    pipe = client.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(usage_key(day.isoformat()))
    for day, fields in zip(days, pipe.execute(), strict=True):
        for field, value in fields.items():
            who, model, _hour, kind = as_text(field).split("|")
            if (owner is None or who == owner) and kind in KINDS:
                yield day.isoformat(), who, model, kind, int(value)


def read_usage(client: redis.Redis, start: date, end: date, owner: str | None, group_by: str
               ) -> list[dict[str, Any]]:
    """Figures from ``start`` to ``end`` (UTC days, both included) of ``owner`` (None: every key), one row
    per model (``group_by="model"``), per day (``"day"``) or per key (``"key"``), each with the three
    counts."""
    rows: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
    for day, who, model, kind, amount in _figures(client, start, end, owner):
        rows[{"model": model, "day": day, "key": who}[group_by]][kind] += amount
    return [{group_by: group, **counts} for group, counts in sorted(rows.items())]


def daily_tokens(client: redis.Redis, start: date, end: date, owner: str | None) -> dict[str, dict[str, int]]:
    """Tokens (prompt + completion) per model per day: ``{model: {day: tokens}}``."""
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for day, _who, model, kind, amount in _figures(client, start, end, owner):
        if kind != "jobs":
            tokens[model][day] += amount
    return {model: dict(days) for model, days in sorted(tokens.items())}


def read_totals(client: redis.Redis) -> dict[tuple[str, str, str], int]:
    """Every key's counts since the start: ``{(owner, model, kind): amount}``."""
    totals = {}
    for field, value in client.hgetall(USAGE_TOTALS_KEY).items():
        owner, model, kind = as_text(field).split("|")
        totals[(owner, model, kind)] = int(value)
    return totals

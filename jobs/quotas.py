"""Quotas of a key made over the API: tokens per UTC day and jobs queued or running at once.

At submission every job holds its token budget (the most it can use: prompt + new tokens, counted
high when the prompt cannot be counted here) on the key's counter for the day, and one active slot; both
checked and taken in one step, for all of a request's jobs or none, so a key never goes over a limit.
When the job ends, its own final transaction gives back what it did not use and its slot
(``settle``): a worker that dies mid-job neither loses nor counts the job twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from config.models import ModelSpec
from jobs.keys import quota_active_key, quota_tokens_key
from jobs.schema import Job

DAY_SECONDS = 24 * 3600
TOKENS_KEPT_SECONDS = 3 * DAY_SECONDS  # a day's counter outlives the day and the jobs that end after it

# KEYS: the day's token counter, the active counter. ARGV: tokens, jobs, the token limit and the active
# limit (-1: none), the counters' lifetime (longer than any job lives: a slot that could not be given
# back, Redis being down just then, is forgotten once the key has made no job for that long).
# Returns 0, or {1, used} / {2, active} for the limit hit.
_RESERVE = """
local tokens, jobs = tonumber(ARGV[1]), tonumber(ARGV[2])
local token_limit, active_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local used = tonumber(redis.call('get', KEYS[1]) or '0')
if token_limit >= 0 and used + tokens > token_limit then return {1, used} end
local active = math.max(0, tonumber(redis.call('get', KEYS[2]) or '0'))
if active_limit >= 0 and active + jobs > active_limit then return {2, active} end
redis.call('incrby', KEYS[1], tokens)
redis.call('expire', KEYS[1], ARGV[5])
redis.call('incrby', KEYS[2], jobs)
redis.call('expire', KEYS[2], ARGV[5])
return 0
"""


def utc_day(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")


def seconds_to_next_day(now: datetime | None = None) -> int:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


@dataclass(frozen=True)
class QuotaExceeded(Exception):
    """A submission that does not fit a key's limit: which, its value, what is in use, when to retry."""

    limit: str
    value: int
    in_use: int
    retry_after: int

    def __str__(self) -> str:
        if self.limit == "tokens_per_day":
            return (f"this key's quota of {self.value} tokens per day (UTC) has {max(0, self.value - self.in_use)} "
                    f"left; the request needs more (prompt + max_new_tokens of each job)")
        return f"this key may have {self.value} jobs queued or running at once and has {self.in_use}"


class Quotas:
    """Takes and gives back a key's token budget and active slots."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._reserve = client.register_script(_RESERVE)

    def hold(self, owner: str, jobs: list[Job], tokens_per_day: int | None, max_active_jobs: int | None) -> list[Job]:
        """``jobs`` with the day they hold their budget on, once all of them fit; else QuotaExceeded and
        nothing taken."""
        day = utc_day()
        tokens = sum(job.token_budget or 0 for job in jobs)
        answer = self._reserve(
            keys=[quota_tokens_key(owner, day), quota_active_key(owner)],
            args=[tokens, len(jobs), _limit(tokens_per_day), _limit(max_active_jobs), TOKENS_KEPT_SECONDS])
        if answer != 0:
            which, in_use = answer
            if which == 1:
                assert tokens_per_day is not None
                raise QuotaExceeded("tokens_per_day", tokens_per_day, int(in_use), seconds_to_next_day())
            assert max_active_jobs is not None
            raise QuotaExceeded("max_active_jobs", max_active_jobs, int(in_use), 5)
        return [job.model_copy(update={"quota_day": day}) for job in jobs]

    def release(self, jobs: list[Job]) -> None:
        """Give back what never-made jobs held (a refused or repeated submission)."""
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            stage_release(pipe, job, used_tokens=0)
        pipe.execute()

    def in_use(self, owner: str) -> dict[str, int]:
        """Today's tokens held or used, and jobs active, of ``owner``."""
        tokens, active = self.redis.mget(quota_tokens_key(owner, utc_day()), quota_active_key(owner))
        return {"tokens_today": int(tokens or 0), "active_jobs": max(0, int(active or 0))}


def stage_release(pipe: Any, job: Job, used_tokens: int) -> None:
    """Give back a held job's unused budget and its active slot (on a transaction or a pipeline)."""
    if job.owner is None or job.quota_day is None:
        return
    unused = max(0, (job.token_budget or 0) - used_tokens)
    if unused:
        pipe.decrby(quota_tokens_key(job.owner, job.quota_day), unused)
    pipe.decr(quota_active_key(job.owner))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def token_budget(spec: ModelSpec, inputs: str, prompt_tokens: int | None, max_new: int | None,
                  max_length: int | None) -> int:
    """The most tokens a job can use, prompt and new: what it holds of a daily token quota. A prompt not
    counted here is bounded by its UTF-8 bytes (a BLOOM token is at least one byte) and the model's limit."""
    prompt = prompt_tokens if prompt_tokens is not None else min(len(inputs.encode()), spec.max_input_tokens)
    new = max_new if max_new is not None else (max_length or 0)
    return min(prompt + new, spec.max_total_tokens)

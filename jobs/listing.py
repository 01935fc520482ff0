"""An API key's own jobs: the owner index (``bloomq:owner-jobs:<key>``, scored by creation time) and its
paged listing, newest first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from jobs.connection import as_text
from jobs.keys import job_key, owner_jobs_key
from jobs.records import read_jobs
from jobs.schema import Job, JobStatus

OWNED_SCAN_LIMIT = 1000  # index entries one listing request examines at most (a status filter may skip many)


@dataclass(frozen=True)
class OwnedPosition:
    """A place in an owner's listing (newest first): the entry with this creation time and job id."""

    created: float
    job_id: str


def stage_owned(pipe: Any, job: Job, retention_seconds: int) -> None:
    """List ``job`` under its owner, and trim that index to the retention window (it never outgrows it)."""
    key = owner_jobs_key(job.owner)
    pipe.zadd(key, {job.id: job.created_at.timestamp()})
    pipe.zremrangebyscore(key, "-inf", f"({time.time() - retention_seconds!r}")
    pipe.expire(key, retention_seconds)


def list_owned(
    client: redis.Redis,
    owner: str | None,
    limit: int,
    after: OwnedPosition | str | None = None,
    status: JobStatus | None = None,
) -> tuple[list[Job], OwnedPosition | None]:
    """``owner``'s jobs, newest first: up to ``limit`` of them after ``after`` (a position, or a job id
    in the listing; LookupError when it is not), and where the next page starts (None at the end).

    Index entries whose record has expired are dropped on the way. At most ``OWNED_SCAN_LIMIT`` entries
    are examined per call, so with a ``status`` filter a page may come back short with a position.
    """
    key = owner_jobs_key(owner)
    if isinstance(after, str):
        score = client.zscore(key, after)
        if score is None:
            raise LookupError(after)
        after = OwnedPosition(score, after)
    chunk = max(limit + 1, 50)
    matched: list[OwnedPosition] = []  # one more than a page, to know whether another page follows
    position, examined, exhausted = after, 0, False
    while len(matched) <= limit and examined < OWNED_SCAN_LIMIT and not exhausted:
        count = min(chunk, OWNED_SCAN_LIMIT - examined)
        entries = _owned_after(client, key, position, count)
        pipe = client.pipeline(transaction=False)
        for entry in entries:
            pipe.hget(job_key(entry.job_id), "status")
        statuses = pipe.execute() if entries else []
        exhausted = len(entries) < count
        gone = []
        for entry, raw in zip(entries, statuses, strict=True):
            examined += 1
            position = entry
            if raw is None:  # the record expired; its index entry goes too
                gone.append(entry.job_id)
            elif status is None or as_text(raw) == status.value:
                matched.append(entry)
                if len(matched) > limit:
                    exhausted = False
                    break
        if gone:
            client.zrem(key, *gone)
    page = matched[:limit]
    jobs = [job for job in read_jobs(client, [entry.job_id for entry in page]) if job is not None]
    if len(matched) > limit:
        return jobs, page[-1]
    return jobs, None if exhausted else position


def _owned_after(client: redis.Redis, key: str, position: OwnedPosition | None, count: int) -> list[OwnedPosition]:
    """Up to ``count`` index entries after ``position``, newest first (ties in reverse id order, as
    ZREVRANGEBYSCORE gives them)."""
    if position is None:
        rows = client.zrevrangebyscore(key, "+inf", "-inf", start=0, num=count, withscores=True)
        return [OwnedPosition(score, as_text(member)) for member, score in rows]
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(key, position.created, position.created)  # entries made in the same instant
    pipe.zrevrangebyscore(key, f"({position.created!r}", "-inf", start=0, num=count, withscores=True)
    ties, older = pipe.execute()
    same = sorted((m for m in map(as_text, ties) if m < position.job_id), reverse=True)
    entries = [OwnedPosition(position.created, m) for m in same]
    entries += [OwnedPosition(score, as_text(member)) for member, score in older]
    return entries[:count]

"""What happened in the last minutes, per model and minute, for the live dashboard: jobs finished (and
why the failed ones failed), tokens generated, how long jobs waited in the queue and for their first token
(bucket counts, so quantiles over any few minutes can be read back). Written in each job's final transaction; a minute's
figures expire after 20 minutes."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import redis

from jobs.connection import as_text
from jobs.keys import activity_key
from jobs.schema import Job, JobStatus

KEPT_SECONDS = 20 * 60
# Upper bounds of the queue-wait buckets, in seconds (the last catches everything longer).
WAIT_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))


def minute_of(seconds: float) -> int:
    return int(seconds // 60)


def stage_activity(pipe: Any, job: Job) -> None:
    """Count a final job in the minute it finished (on the job's final transaction)."""
    if job.finished_at is None:
        return
    key = activity_key(minute_of(job.finished_at.timestamp()))
    model = job.model
    pipe.hincrby(key, f"{model}|finished", 1)
    if job.status is JobStatus.FAILED:
        pipe.hincrby(key, f"{model}|failed:{job.error.type if job.error else 'unknown'}", 1)
    if job.output is not None and job.output.generated_tokens:
        pipe.hincrby(key, f"{model}|tokens", job.output.generated_tokens)
    for figure, seconds in (("wait", job.metrics.queue_seconds), ("ttft", job.metrics.time_to_first_token)):
        if seconds is not None:
            bucket = next(i for i, bound in enumerate(WAIT_BOUNDS) if seconds <= bound)
            pipe.hincrby(key, f"{model}|{figure}:{bucket}", 1)
    pipe.expire(key, KEPT_SECONDS)


def read_activity(client: redis.Redis, minutes: int = 15, now: float | None = None
                  ) -> tuple[list[int], dict[str, list[dict[str, int]]]]:
    """The last ``minutes`` minutes (oldest first, the current one last) and, per model, each minute's
    figures: ``finished``, ``tokens``, ``failed:<type>``, and ``wait:<bucket>`` / ``ttft:<bucket>`` counts
    (queue wait, time to first token)."""
    current = minute_of(time.time() if now is None else now)
    span = list(range(current - minutes + 1, current + 1))
    pipe = client.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(activity_key(minute))
    per_model: dict[str, list[dict[str, int]]] = defaultdict(lambda: [{} for _ in span])
    for i, fields in enumerate(pipe.execute()):
        for field, value in fields.items():
            model, figure = as_text(field).split("|", 1)
            per_model[model][i][figure] = int(value)
    return span, dict(per_model)


def quantile(minutes: list[dict[str, int]], figure: str, q: float) -> float | None:
    """The ``q`` quantile of ``figure`` (``wait`` or ``ttft``) over these minutes, as the upper bound of
    its bucket (None: no job finished; the open-ended last bucket reads as its lower bound, 1800 s)."""
    counts = [sum(m.get(f"{figure}:{i}", 0) for m in minutes) for i in range(len(WAIT_BOUNDS))]
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for bound, count in zip(WAIT_BOUNDS, counts, strict=True):
        seen += count
        if seen >= q * total:
            return bound if bound != float("inf") else WAIT_BOUNDS[-2]
    return WAIT_BOUNDS[-2]

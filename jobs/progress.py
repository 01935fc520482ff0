"""The progress protocol between a worker and the store: what a worker reports about its running jobs
(new text, token counts, partial outputs) and what it is told back (stop these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from jobs.connection import as_text
from jobs.events import stage_event
from jobs.keys import job_key
from jobs.records import progress_field
from jobs.schema import JobOutput, JobStatus


@dataclass(frozen=True)
class ProgressUpdate:
    """What a worker reports about one running job: new text, token count, maybe a partial output."""

    job_id: str
    delta: str
    tokens: int
    output: JobOutput | None = None
    attempt: int = 0  # which attempt produced it: readers ignore reports of an attempt no longer current
    restarted: bool = False  # the engine started the text over (within the same attempt) since the last report
    token_details: list[dict[str, Any]] | None = None  # the new tokens, one each, for jobs that asked for details


@dataclass(frozen=True)
class ProgressReply:
    """What the store tells a worker back about the jobs it reported on."""

    cancel: set[str]  # a cancel was requested: stop them
    superseded: set[str]  # no longer this attempt's to run (requeued, taken over, finished elsewhere): stop them


def publish_progress(client: redis.Redis, updates: list[ProgressUpdate], retention_seconds: int) -> ProgressReply:
    """Stream new text and record partial outputs for running jobs, in one round trip.

    Replies which of those jobs have a cancel request (a fallback to the pub/sub message) and which
    are no longer the reporting attempt's (requeued or taken over while it ran: it must stop).
    Partial output lives in the record's ``progress:<attempt>`` field, apart from the document, so no
    transaction is needed; it is shown only for the current attempt of a running job.
    """
    if not updates:
        return ProgressReply(set(), set())
    pipe = client.pipeline(transaction=False)
    for update in updates:
        pipe.hmget(job_key(update.job_id), "cancel", "status", "attempt")
    for update in updates:
        if update.restarted:
            stage_event(pipe, update.job_id, "restart", {"attempt": update.attempt}, retention_seconds)
        if update.delta or update.token_details:
            token: dict[str, Any] = {"text": update.delta, "index": update.tokens, "attempt": update.attempt}
            if update.token_details is not None:
                token["tokens"] = update.token_details
            stage_event(pipe, update.job_id, "token", token, retention_seconds)
        if update.output is not None:
            pipe.hset(job_key(update.job_id), progress_field(update.attempt), update.output.model_dump_json())
    states = pipe.execute()[: len(updates)]
    cancel, superseded = set(), set()
    for update, (flag, status, attempt) in zip(updates, states, strict=True):
        if flag:
            cancel.add(update.job_id)
        if status is None or as_text(status) != JobStatus.RUNNING.value:
            superseded.add(update.job_id)
        elif attempt is not None and int(attempt) != update.attempt:
            superseded.add(update.job_id)
    return ProgressReply(cancel, superseded)

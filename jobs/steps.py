"""What a job's change causes besides the record itself, as named steps staged on the change's own
transaction: the running and queued indexes, the event stream, the batch's line counters, the deadline
index, the metrics, the key's quota and usage, the minute's activity, the webhook outbox and the change's
notice. Being in the same transaction, each happens exactly once per change, whichever process made it.

Each transition step takes the pipeline (after MULTI) and the ``Change``; ``TRANSITION_STEPS`` is their
order, which is the order of the writes in the transaction (a job's ``status`` event before its ``done``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import metrics, outbox
from jobs.activity import stage_activity
from jobs.events import stage_event, stage_notice
from jobs.keys import DEADLINES_KEY, RUNNING_KEY, batch_key, job_key, job_stream_key, queued_key
from jobs.listing import stage_owned
from jobs.quotas import stage_release
from jobs.records import progress_field
from jobs.schema import Job, JobStatus
from jobs.transitions import EXPIRED
from jobs.usage import stage_usage, used_tokens


@dataclass(frozen=True)
class Change:
    """One job's change, as the store is about to write it."""

    before: Job
    after: Job
    retention_seconds: int
    # A job that becomes queued enters the queued index with this score (None: now; SEND_NOW: it has no
    # message and a reaper sends one).
    queued_score: float | None = None
    status_event: bool = True  # whether a change of status (or of the cancel flag) is told in the stream


def write_record(pipe: Any, change: Change) -> None:
    """The record itself, kept for the retention period from now; a final one drops its partial output."""
    before, after = change.before, change.after
    key = job_key(after.id)
    pipe.hset(key, mapping={"status": after.status.value, "attempt": after.attempts, "doc": after.to_json()})
    pipe.expire(key, change.retention_seconds)
    if after.cancel_requested and not before.cancel_requested:
        pipe.hset(key, "cancel", "1")
    if after.status.terminal:
        pipe.hdel(key, progress_field(after.attempts))


def index_running(pipe: Any, change: Change) -> None:
    """Keep the reaper's set of running jobs in step."""
    before, after = change.before, change.after
    if after.status is JobStatus.RUNNING and before.status is not JobStatus.RUNNING:
        pipe.sadd(RUNNING_KEY, after.id)
    elif before.status is JobStatus.RUNNING and after.status is not JobStatus.RUNNING:
        pipe.srem(RUNNING_KEY, after.id)


def index_queued(pipe: Any, change: Change) -> None:
    """Keep the model's index of queued interactive jobs (the lost-delivery scan) in step."""
    before, after = change.before, change.after
    if after.priority_class != "interactive":
        return
    if after.status is JobStatus.QUEUED and before.status is not JobStatus.QUEUED:
        score = time.time() if change.queued_score is None else change.queued_score
        pipe.zadd(queued_key(after.model), {after.id: score})
    elif before.status is JobStatus.QUEUED and after.status is not JobStatus.QUEUED:
        pipe.zrem(queued_key(after.model), after.id)


def tell_status(pipe: Any, change: Change) -> None:
    """A ``status`` event when the status or the cancel flag changed."""
    before, after = change.before, change.after
    if change.status_event and (after.status != before.status or after.cancel_requested != before.cancel_requested):
        data = {"status": after.status.value, "cancel_requested": after.cancel_requested, "attempt": after.attempts}
        stage_event(pipe, after.id, "status", data, change.retention_seconds)


def tell_done(pipe: Any, change: Change) -> None:
    """The ``done`` event, with the whole final job, that ends the stream."""
    if change.after.status.terminal:
        stage_event(pipe, change.after.id, "done", change.after.model_dump(mode="json"), change.retention_seconds)


def count_batch_line(pipe: Any, change: Change) -> None:
    """A batch line's final result counted in its batch's record, exactly once."""
    after = change.after
    if not after.status.terminal or after.batch_id is None:
        return
    outcome = "completed" if after.status is JobStatus.SUCCEEDED else "failed"
    pipe.hincrby(batch_key(after.batch_id), outcome, 1)
    if after.error is not None and after.error.type == EXPIRED.type:
        pipe.hincrby(batch_key(after.batch_id), "expired", 1)


def drop_deadline(pipe: Any, change: Change) -> None:
    """A final job leaves the deadline index."""
    if change.after.status.terminal:
        pipe.zrem(DEADLINES_KEY, change.after.id)


def count_finished(pipe: Any, change: Change) -> None:
    """A final job counted in the metrics, with its timings."""
    if change.after.status.terminal:
        metrics.record_finished(pipe, change.after)


def settle_quota(pipe: Any, change: Change) -> None:
    """A job that ends gives back the part of its token budget it did not use, and its active slot."""
    before, after = change.before, change.after
    if after.status.terminal and not before.status.terminal:
        stage_release(pipe, after, sum(used_tokens(after)))


def count_usage(pipe: Any, change: Change) -> None:
    """A job that ends adds its tokens to its key's usage, and to the minute's activity."""
    if change.after.status.terminal and not change.before.status.terminal:
        stage_usage(pipe, change.after)
        stage_activity(pipe, change.after)


def queue_webhook(pipe: Any, change: Change) -> None:
    """The webhook this change calls for, if the job asked for it: ``completed`` when the job gets its
    final result, ``started`` when an attempt of it starts running."""
    before, after = change.before, change.after
    if after.status.terminal and not before.status.terminal:
        event = "completed"
    elif after.status is JobStatus.RUNNING and (before.status is not JobStatus.RUNNING
                                                or after.attempts != before.attempts):
        event = "started"
    else:
        return
    if after.webhook and event in after.webhook_events:
        outbox.stage(pipe, after.id, event, after.attempts)


def announce(pipe: Any, change: Change) -> None:
    """Wake whoever waits on the job."""
    stage_notice(pipe, change.after.id, change.after.status.value)


TRANSITION_STEPS: tuple[Callable[[Any, Change], None], ...] = (
    write_record,
    index_running,
    index_queued,
    tell_status,
    tell_done,
    count_batch_line,
    drop_deadline,
    count_finished,
    settle_quota,
    count_usage,
    queue_webhook,
    announce,
)


def stage_change(pipe: Any, change: Change) -> None:
    """Every write of one change, in order, on a transaction (``pipe`` after MULTI)."""
    for step in TRANSITION_STEPS:
        step(pipe, change)


def stage_created(pipe: Any, job: Job, retention_seconds: int) -> None:
    """The writes that make ``job`` exist, queued, added to a transaction (``pipe`` after MULTI): its
    record, its first event, the deadline, queued and owner indexes, and the submission count."""
    key = job_key(job.id)
    pipe.hset(key, mapping={"status": job.status.value, "attempt": job.attempts, "doc": job.to_json()})
    pipe.expire(key, retention_seconds)
    created = {"status": job.status.value, "cancel_requested": False, "attempt": 0}
    stage_event(pipe, job.id, "status", created, retention_seconds)
    if job.deadline is not None:
        pipe.zadd(DEADLINES_KEY, {job.id: job.deadline.timestamp()})
    metrics.record_submitted(pipe, job)
    if job.priority_class == "interactive":
        pipe.zadd(queued_key(job.model), {job.id: time.time()})
    stage_owned(pipe, job, retention_seconds)


def stage_deleted(pipe: Any, job: Job) -> None:
    """The writes that remove a job record and its index entries (its submission was refused)."""
    pipe.delete(job_key(job.id), job_stream_key(job.id))
    pipe.zrem(DEADLINES_KEY, job.id)
    pipe.zrem(queued_key(job.model), job.id)
    metrics.unrecord_submitted(pipe, job)
    stage_release(pipe, job, used_tokens=0)

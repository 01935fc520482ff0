"""A job's state transitions: given a job and what happened, the job after it, or None when the event
changes nothing (it comes too late, from a stale attempt, or does not apply in the job's state).

Pure: no Redis and no clock (the time is passed in), so every rule here is testable on its own. The store
applies them inside its optimistic transactions (``JobStore._update``), and stages what a change causes
(``jobs/steps.py``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from jobs.schema import Job, JobError, JobMetrics, JobOutput, JobStatus

log = logging.getLogger(__name__)

EXPIRED = JobError(type="expired", message="the job was still queued at its deadline")
STUCK = JobError(type="timeout", message="the job was still running well after its deadline")
POISON_AFTER = 2  # fatal device errors a job may be part of before it is failed as a poison job


class CancelOutcome:
    """What a cancel request did."""

    CANCELED = "canceled"  # it was queued: it will never run
    REQUESTED = "cancel_requested"  # it is running: the worker stops it within one step
    ALREADY_FINAL = "already_final"  # nothing to do


def expired(job: Job, now: datetime) -> Job | None:
    """``job`` failed as expired, if it is still queued at or past its deadline; else None."""
    if not job.overdue(now):
        return None
    return job.model_copy(update={"status": JobStatus.FAILED, "finished_at": now, "error": EXPIRED})


def started(job: Job, worker: str, instance: str, owner_alive: bool, now: datetime) -> Job | None:
    """``job`` running on ``worker`` (process ``instance``) as its next attempt.

    None when it already has its final result or is running on a live instance (``owner_alive``); a job
    whose deadline passed while it was queued comes back failed (expired) instead.
    """
    if job.status.terminal or owner_alive:
        return None
    late = expired(job, now)
    if late is not None:
        return late
    metrics = job.metrics
    if job.attempts == 0:
        metrics = metrics.model_copy(update={"queue_seconds": _seconds(job.created_at, now)})
    return job.model_copy(
        update={
            "status": JobStatus.RUNNING,
            "started_at": now,
            "worker": worker,
            "worker_instance": instance,
            "attempts": job.attempts + 1,
            "metrics": metrics,
        }
    )


def finished(
    job: Job,
    status: JobStatus,
    now: datetime,
    *,
    output: JobOutput | None = None,
    error: JobError | None = None,
    metrics: dict[str, Any],
    attempt: int | None = None,
) -> Job | None:
    """``job`` with its one final result: None once it has one, or when the result comes from a stale
    attempt (``attempt`` given and the job is no longer running that attempt: it was requeued)."""
    if job.status.terminal:
        log.warning("job %s already %s; a late result was dropped", job.id, job.status.value)
        return None
    if attempt is not None and (job.status is not JobStatus.RUNNING or job.attempts != attempt):
        log.warning("job %s: a result from attempt %d was dropped (the job is %s, attempt %d)",
                    job.id, attempt, job.status.value, job.attempts)
        return None
    return job.model_copy(
        update={
            "status": status,
            "finished_at": now,
            "output": output,
            "error": error,
            "metrics": JobMetrics(**{**job.metrics.model_dump(), **_with_time_to_first_token(job, metrics)}),
        }
    )


def canceled(job: Job, now: datetime) -> tuple[Job | None, str]:
    """``job`` after a cancel request, and what the request did: a queued job is canceled at once, a
    running one is marked for its worker to stop; a final one is left as it is (None)."""
    if job.status.terminal:
        return None, CancelOutcome.ALREADY_FINAL
    if job.status is JobStatus.QUEUED:
        return job.model_copy(update={"status": JobStatus.CANCELED, "finished_at": now}), CancelOutcome.CANCELED
    return job.model_copy(update={"cancel_requested": True}), CancelOutcome.REQUESTED


def device_faulted(job: Job, attempt: int, message: str, blamed: bool, now: datetime) -> Job | None:
    """``job`` after its worker's device failed for good while attempt ``attempt`` was in its process.

    Back to queued; ``blamed`` (it was in the batch the device failed on) counts the fault against it,
    and at its ``POISON_AFTER``-th fault it fails as a poison job instead. None when the attempt no
    longer owns the job.
    """
    if job.status is not JobStatus.RUNNING or job.attempts != attempt:
        return None
    faults = job.device_faults + (1 if blamed else 0)
    if faults >= POISON_AFTER:
        error = JobError(
            type="poison_job",
            message=f"a worker's device failed fatally {faults} times while running this job, the last "
            f"time with it running alone ({message}); it is not retried",
        )
        return job.model_copy(
            update={"status": JobStatus.FAILED, "finished_at": now, "error": error, "device_faults": faults}
        )
    return job.model_copy(
        update={"status": JobStatus.QUEUED, "worker": None, "worker_instance": None, "device_faults": faults}
    )


def orphan_requeued(job: Job, live_instances: set[str]) -> Job | None:
    """``job`` back to queued if it is running on a worker instance that is no longer live; else None."""
    if job.status is not JobStatus.RUNNING or job.worker_instance in live_instances:
        return None
    log.warning("job %s: worker %s is gone; requeueing (attempt %d)", job.id, job.worker_instance, job.attempts)
    return job.model_copy(update={"status": JobStatus.QUEUED, "worker": None, "worker_instance": None})


def stuck_failed(job: Job, grace_seconds: float, now: datetime) -> Job | None:
    """``job`` failed if it is still running ``grace_seconds`` past its deadline (its worker should have
    stopped it); else None."""
    if job.status is not JobStatus.RUNNING or job.deadline is None:
        return None
    if (now - job.deadline).total_seconds() < grace_seconds:
        return None
    return job.model_copy(update={"status": JobStatus.FAILED, "finished_at": now, "error": STUCK})


def model_metrics(output: JobOutput | None, inference_seconds: float | None,
                  first_token_seconds: float | None = None) -> dict[str, float | None]:
    """The metrics a worker's result adds: inference time, time per generated token, and (kept apart
    until the job's times are known, see ``finished``) the attempt's time to its first token."""
    tokens = output.generated_tokens if output else 0
    per_token = round(inference_seconds / tokens, 9) if inference_seconds is not None and tokens else None
    metrics: dict[str, float | None] = {"inference_seconds": inference_seconds, "seconds_per_token": per_token}
    if first_token_seconds is not None:
        metrics[FIRST_TOKEN] = first_token_seconds
    return metrics


FIRST_TOKEN = "first_token_seconds"  # from an attempt's start to its first token


def _with_time_to_first_token(job: Job, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the attempt's first-token time turned into the job's: from submission."""
    metrics = dict(metrics)
    first = metrics.pop(FIRST_TOKEN, None)
    if first is not None and job.started_at is not None:
        metrics["time_to_first_token"] = round(_seconds(job.created_at, job.started_at) + first, 6)
    return metrics


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 6)

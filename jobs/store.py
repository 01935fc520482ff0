"""The Redis job store: the one source of truth for a job's status and result.

Celery only carries job ids; every job record lives here under ``bloomq:job:<id>`` (a hash with the
``status`` and the JSON ``doc``), expiring ``retention`` seconds after its last write. Transitions are
optimistic transactions (WATCH/MULTI) so that a job gets exactly one final result even when a message is
delivered twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

import redis

from jobs.schema import Job, JobError, JobMetrics, JobOutput, JobStatus, utcnow

log = logging.getLogger(__name__)

JOB_KEY_PREFIX = "bloomq:job:"
JOB_EVENTS_PREFIX = "bloomq:job-events:"


def job_key(job_id: str) -> str:
    """The Redis key of a job record."""
    return f"{JOB_KEY_PREFIX}{job_id}"


def job_events_channel(job_id: str) -> str:
    """The pub/sub channel that announces a job's status changes."""
    return f"{JOB_EVENTS_PREFIX}{job_id}"


def connect(url: str) -> redis.Redis:
    """A Redis client with short timeouts, so a dead Redis is reported instead of hanging a request."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=15,
        retry_on_timeout=True,
    )


class JobStore:
    """Create, read and advance job records."""

    def __init__(self, client: redis.Redis, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds

    def create(self, job: Job) -> None:
        """Store a new job (status queued)."""
        key = job_key(job.id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"status": job.status.value, "doc": job.to_json()})
        pipe.expire(key, self.retention_seconds)
        pipe.execute()

    def delete(self, job_id: str) -> None:
        """Remove a job record (used when its message could not be queued)."""
        self.redis.delete(job_key(job_id))

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it is unknown or expired."""
        raw = self.redis.hget(job_key(job_id), "doc")
        return None if raw is None else Job.from_json(raw)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is terminal, or as it is after ``timeout`` seconds; None when unknown."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribe before reading, so a change between the read and the wait is not missed.
            pubsub.subscribe(job_events_channel(job_id))
            job = self.get(job_id)
            deadline = time.monotonic() + timeout
            while job is not None and not job.status.terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                pubsub.get_message(timeout=min(left, 1.0))
                job = self.get(job_id)
            return job
        finally:
            pubsub.close()

    def start(self, job_id: str, worker: str) -> Job | None:
        """Mark a job running on ``worker``; None when it is unknown or already has its final result."""

        def mutate(job: Job) -> Job | None:
            if job.status.terminal:
                return None
            now = utcnow()
            metrics = job.metrics
            if job.attempts == 0:
                metrics = metrics.model_copy(update={"queue_seconds": _seconds(job.created_at, now)})
            return job.model_copy(
                update={
                    "status": JobStatus.RUNNING,
                    "started_at": now,
                    "worker": worker,
                    "attempts": job.attempts + 1,
                    "metrics": metrics,
                }
            )

        return self._update(job_id, mutate)

    def succeed(self, job_id: str, output: JobOutput, inference_seconds: float) -> Job | None:
        """Record the final output; None when the job already had a final result (it is kept)."""
        per_token = round(inference_seconds / output.generated_tokens, 9) if output.generated_tokens else None
        return self._finish(
            job_id,
            JobStatus.SUCCEEDED,
            output=output,
            metrics={"inference_seconds": inference_seconds, "seconds_per_token": per_token},
        )

    def fail(self, job_id: str, error: JobError, inference_seconds: float | None = None) -> Job | None:
        """Record a failure; None when the job already had a final result (it is kept)."""
        return self._finish(job_id, JobStatus.FAILED, error=error, metrics={"inference_seconds": inference_seconds})

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        output: JobOutput | None = None,
        error: JobError | None = None,
        metrics: dict[str, float | None],
    ) -> Job | None:
        def mutate(job: Job) -> Job | None:
            if job.status.terminal:
                log.warning("job %s already %s; a late result was dropped", job.id, job.status.value)
                return None
            return job.model_copy(
                update={
                    "status": status,
                    "finished_at": utcnow(),
                    "output": output,
                    "error": error,
                    "metrics": JobMetrics(**{**job.metrics.model_dump(), **metrics}),
                }
            )

        return self._update(job_id, mutate)

    def _update(self, job_id: str, mutate: Callable[[Job], Job | None]) -> Job | None:
        """Apply ``mutate`` atomically; a concurrent writer makes us re-read and try again."""
        key = job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "doc")
                    if raw is None:
                        pipe.unwatch()
                        return None
                    updated = mutate(Job.from_json(raw))
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, mapping={"status": updated.status.value, "doc": updated.to_json()})
                    pipe.expire(key, self.retention_seconds)
                    pipe.publish(job_events_channel(job_id), updated.status.value)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 6)

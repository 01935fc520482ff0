"""The Redis job store: the one source of truth for a job's status and result.

Celery only carries job ids; every job record lives in Redis (``jobs/records.py``), expiring
``retention`` seconds after its last write. Transitions (``jobs/transitions.py``) are applied in
optimistic transactions (WATCH/MULTI), so that a job gets exactly one final result even when a message is
delivered twice, and what a change causes (``jobs/steps.py``: indexes, events, batch counters, metrics,
webhooks) is written in the same transaction. ``JobStore`` is the one object both processes hold; it
composes those with the event stream (``jobs/events.py``), the progress protocol (``jobs/progress.py``),
the owner listing (``jobs/listing.py``) and the reaper's queries (``jobs/reaper_queries.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis

from jobs import events, listing, progress, records, steps, transitions
from jobs.connection import as_text, replicated
from jobs.keys import CANCEL_CHANNEL, job_key
from jobs.listing import OwnedPosition
from jobs.progress import ProgressReply, ProgressUpdate
from jobs.reaper_queries import SEND_NOW, ReaperQueries
from jobs.schema import Job, JobError, JobOutput, JobStatus, utcnow
from jobs.transitions import CancelOutcome
from jobs.workers import WORKER_KEY_PREFIX


class JobStore:
    """Create, read and advance job records."""

    def __init__(self, client: redis.Redis, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self.reaper_queries = ReaperQueries(client)

    # -- reading -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it is unknown or expired; a running job shows its latest progress."""
        return records.read_job(self.redis, job_id)

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Several jobs (as ``get`` reads them) in one round trip."""
        return records.read_jobs(self.redis, job_ids)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is terminal, or as it is after ``timeout`` seconds; None when unknown."""
        return events.wait_final(self.redis, job_id, timeout)

    def read_events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, str]]:
        """Events after stream id ``after`` as (id, event, data), waiting up to ``block_ms`` for one."""
        return events.read_events(self.redis, job_id, after, block_ms)

    def list_owned(
        self,
        owner: str | None,
        limit: int,
        after: OwnedPosition | str | None = None,
        status: JobStatus | None = None,
    ) -> tuple[list[Job], OwnedPosition | None]:
        """``owner``'s jobs, newest first, a page at a time (see ``listing.list_owned``)."""
        return listing.list_owned(self.redis, owner, limit, after, status)

    # -- creating ----------------------------------------------------------------------------------

    def create(self, job: Job, idempotency: tuple[str, str] | None = None) -> str | None:
        """Store a new job (status queued).

        ``idempotency``: (Redis key, record) bound to the job in the same transaction, unless the key is
        already bound: then nothing is written and the key's existing record comes back.
        """
        earlier = self.create_all([job], [idempotency] if idempotency is not None else None)
        return earlier[0] if earlier is not None else None

    def create_all(self, jobs: list[Job], idempotency: list[tuple[str, str]] | None = None) -> list[str] | None:
        """Store new jobs (status queued), all in one transaction: every one of them or none.

        ``idempotency``: one (Redis key, record) per job, bound in the same transaction. When the keys are
        already bound, nothing is written and their records come back (one per job; a key bound on its
        own, its siblings gone, comes back as a ValueError).
        """
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idempotency is not None:
                        keys = [key for key, _ in idempotency]
                        pipe.watch(*keys)
                        earlier = [pipe.get(key) for key in keys]
                        if any(record is not None for record in earlier):
                            pipe.unwatch()
                            if any(record is None for record in earlier):
                                raise ValueError("some of these idempotency keys are bound, others are not")
                            return [as_text(record) for record in earlier if record is not None]
                    pipe.multi()
                    for index, job in enumerate(jobs):
                        self.stage_new(pipe, job)
                        if idempotency is not None:
                            pipe.set(idempotency[index][0], idempotency[index][1], ex=self.retention_seconds)
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def stage_new(self, pipe: Any, job: Job) -> None:
        """The writes that make ``job`` exist, queued, added to a transaction (``pipe`` after MULTI)."""
        steps.stage_created(pipe, job, self.retention_seconds)

    def replicated(self, job_ids: list[str], replicas: int, timeout_seconds: float) -> bool:
        """Whether the records of ``job_ids`` and every earlier write reached ``replicas`` replicas
        (see ``connection.replicated``)."""
        return replicated(self.redis, job_ids, replicas, timeout_seconds)

    def delete(self, job: Job) -> None:
        """Remove a job record and its index entries (used when its submission was refused)."""
        pipe = self.redis.pipeline(transaction=True)
        steps.stage_deleted(pipe, job)
        pipe.execute()

    # -- a worker's transitions --------------------------------------------------------------------

    def start(self, job_id: str, worker: str, instance: str | None = None) -> Job | None:
        """Mark a job running on ``worker`` (process ``instance``).

        None when it is unknown, already has its final result, or is running on an instance that is
        still live, this one included: a running job is taken over only when, inside the same
        transaction, its owner's heartbeat is gone (two deliveries of one job never both run it, on two
        workers or in one). A job whose deadline passed while it was queued comes back ``failed``
        (expired) instead of running.
        """
        instance = instance or worker

        def owner_alive(pipe: Any, job: Job) -> bool:
            if job.status is not JobStatus.RUNNING or job.worker_instance is None:
                return False
            if job.worker_instance == instance:
                return True  # a second delivery to the process that runs it
            owner_key = WORKER_KEY_PREFIX + job.worker_instance
            pipe.watch(owner_key)
            return bool(pipe.exists(owner_key))

        def mutate(job: Job, alive: bool) -> Job | None:
            return transitions.started(job, worker, instance, alive, utcnow())

        return self._update(job_id, mutate, read=owner_alive)

    def publish_progress(self, updates: list[ProgressUpdate]) -> ProgressReply:
        """Stream new text and record partial outputs for running jobs, in one round trip; which of them
        to stop (see ``progress.publish_progress``)."""
        return progress.publish_progress(self.redis, updates, self.retention_seconds)

    def succeed(
        self, job_id: str, output: JobOutput, inference_seconds: float, attempt: int | None = None,
        first_token_seconds: float | None = None,
    ) -> Job | None:
        """Record the final output; None when it is not accepted (see ``transitions.finished``).
        ``first_token_seconds``: from the attempt's start to its first token."""
        metrics = transitions.model_metrics(output, inference_seconds, first_token_seconds)
        return self._finish(job_id, JobStatus.SUCCEEDED, output=output, metrics=metrics, attempt=attempt)

    def fail(
        self,
        job_id: str,
        error: JobError,
        inference_seconds: float | None = None,
        output: JobOutput | None = None,
        attempt: int | None = None,
    ) -> Job | None:
        """Record a failure (with any partial output); None when it is not accepted (see ``transitions.finished``)."""
        if output:
            metrics = transitions.model_metrics(output, inference_seconds)
        else:
            metrics = {"inference_seconds": inference_seconds}
        return self._finish(job_id, JobStatus.FAILED, error=error, output=output, metrics=metrics, attempt=attempt)

    def finish_canceled(
        self, job_id: str, output: JobOutput, inference_seconds: float, attempt: int | None = None
    ) -> Job | None:
        """A running job stopped on request, with the text it had so far."""
        metrics = transitions.model_metrics(output, inference_seconds)
        return self._finish(job_id, JobStatus.CANCELED, output=output, metrics=metrics, attempt=attempt)

    def record_device_fault(self, job_id: str, attempt: int, message: str, blamed: bool = True) -> Job | None:
        """Attempt ``attempt`` of a job was in its worker's process when the device failed for good.

        The job goes back to queued, marked for a live reaper to send at once (``to_send_now``), or
        fails as a poison job (see ``transitions.device_faulted``). None when the attempt no longer owns
        the job.
        """
        # The failing process sends no message (its own consumer could take it as it dies): the job is
        # queued marked for any live reaper to send at once, in the same transaction.
        return self._update(job_id, lambda job: transitions.device_faulted(job, attempt, message, blamed, utcnow()),
                            queued_score=SEND_NOW)

    # -- a client's cancel -------------------------------------------------------------------------

    def cancel(self, job_id: str) -> tuple[Job | None, str]:
        """Cancel a job: a queued one at once, a running one by asking its worker. Idempotent."""
        outcome = CancelOutcome.ALREADY_FINAL

        def mutate(job: Job) -> Job | None:
            nonlocal outcome
            updated, outcome = transitions.canceled(job, utcnow())
            return updated

        updated = self._update(job_id, mutate)
        if outcome == CancelOutcome.REQUESTED:
            self.redis.publish(CANCEL_CHANNEL, job_id)
        return (updated or self.get(job_id)), outcome

    # -- the reaper --------------------------------------------------------------------------------

    def running_jobs(self) -> list[str]:
        """Ids of the jobs currently marked running."""
        return self.reaper_queries.running_jobs()

    def to_send_now(self, model: str, limit: int = 500) -> list[str]:
        """``model``'s queued jobs that have no message at all (handed back by a failing worker)."""
        return self.reaper_queries.to_send_now(model, limit)

    def claim_send_now(self, model: str, job_id: str) -> bool:
        """Claim the sending of a handed-back job: True for exactly one caller."""
        return self.reaper_queries.claim_send_now(model, job_id)

    def stale_queued(self, model: str, older_than: float, limit: int = 500) -> list[str]:
        """``model``'s interactive jobs queued (or last re-sent) more than ``older_than`` seconds ago."""
        return self.reaper_queries.stale_queued(model, older_than, limit)

    def claim_resend(self, model: str, job_id: str, older_than: float) -> bool:
        """Claim the re-sending of a queued job's lost message: True for exactly one caller per ``older_than``."""
        return self.reaper_queries.claim_resend(model, job_id, older_than)

    def requeue_if_orphaned(self, job_id: str, live_instances: set[str]) -> Job | None:
        """Put a running job whose worker is no longer live back to queued; None when it is not orphaned.

        The caller then sends it to its queue again. The dead worker's attempt number is now stale, so
        a late result from it is refused (``transitions.finished``); its original message, if Redis ever
        redelivers it, finds the job finished and is acknowledged without running.
        """
        updated = self._update(job_id, lambda job: transitions.orphan_requeued(job, live_instances))
        if updated is None:
            job = self.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                self.reaper_queries.forget_running(job_id)  # a stale index entry
        return updated

    def fail_if_stuck(self, job_id: str, grace_seconds: float) -> Job | None:
        """Fail a running job that is ``grace_seconds`` past its deadline (its worker should have stopped it)."""
        return self._update(job_id, lambda job: transitions.stuck_failed(job, grace_seconds, utcnow()))

    def expire_overdue(self, now: datetime | None = None) -> list[str]:
        """Fail queued jobs whose deadline has passed (``error.type = "expired"``); return their ids."""
        cutoff = (now or utcnow()).timestamp()
        expired = []
        for job_id in self.reaper_queries.past_deadline(cutoff):
            if self.expire_if_queued(job_id) is not None:
                expired.append(job_id)
            self.reaper_queries.forget_deadline(job_id)
        return expired

    def expire_if_queued(self, job_id: str) -> Job | None:
        """Fail a job that is still queued past its deadline; None when it is not."""
        return self._update(job_id, lambda job: transitions.expired(job, utcnow()))

    # -- internals ---------------------------------------------------------------------------------

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        output: JobOutput | None = None,
        error: JobError | None = None,
        metrics: dict[str, Any],
        attempt: int | None = None,
    ) -> Job | None:
        """The one final result (see ``transitions.finished``)."""

        def mutate(job: Job) -> Job | None:
            return transitions.finished(job, status, utcnow(), output=output, error=error, metrics=metrics,
                                        attempt=attempt)

        return self._update(job_id, mutate)

    def _update(
        self,
        job_id: str,
        mutate: Callable[..., Job | None],
        status_event: bool = True,
        read: Callable[[Any, Job], Any] | None = None,
        queued_score: float | None = None,
    ) -> Job | None:
        """Apply ``mutate`` atomically, with every step the change causes; a concurrent writer makes us
        re-read and try again.

        ``read(pipe, job)``: watches and reads other keys the change depends on; its answer is passed to
        ``mutate`` as a second argument, and a change to those keys also makes us try again.
        ``queued_score``: a job that becomes queued enters the queued index with this score (default: now;
        ``SEND_NOW``: it has no message and a reaper sends one).
        """
        key = job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "doc")
                    if raw is None:
                        pipe.unwatch()
                        return None
                    before = Job.from_json(raw)
                    updated = mutate(before) if read is None else mutate(before, read(pipe, before))
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    steps.stage_change(pipe, steps.Change(before, updated, self.retention_seconds, queued_score,
                                                          status_event))
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

"""Queuing an accepted batch: all of its jobs, in chunks, resumable by anyone, beaten by a cancel.

A batch is validated whole before anything is written (the web does that). Then one transaction stores
the batch (``in_progress``), its lines, and the jobs still to queue (their documents, in order) with an
intake cursor. Each chunk of jobs is then made and queued in one transaction that also moves the
cursor, so a chunk is queued whole or not at all, and never twice. If the process doing it dies, the
batch is listed in ``bloomq:batch-intakes`` with the time of its last chunk, and a worker's recovery
loop finishes the intake once it has stalled.

A cancel sets the intake's ``cancelled`` flag in the same transaction that marks the batch cancelling;
a chunk transaction watches that flag, so no chunk is queued after the cancel. The jobs never queued are
then counted as failed lines, so the batch's counters still add up to its total and it ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from jobs.batches import BatchLine, BatchObject, BatchStore
from jobs.keys import batch_key
from jobs.queues import BatchQueue
from jobs.quotas import stage_release
from jobs.schema import Job
from jobs.store import JobStore

log = logging.getLogger(__name__)

INTAKES_KEY = "bloomq:batch-intakes"  # batch id -> when its intake last made progress
INTAKE_PREFIX = "bloomq:batch-intake:"  # + batch id: a hash with the cursor and the cancelled flag
INTAKE_JOBS_PREFIX = "bloomq:batch-intake-jobs:"  # + batch id: the documents of the jobs to queue, in order
CHUNK = 200  # jobs made and queued per transaction


def _state_key(batch_id: str) -> str:
    return INTAKE_PREFIX + batch_id


def _jobs_key(batch_id: str) -> str:
    return INTAKE_JOBS_PREFIX + batch_id


class BatchIntake:
    """Stores an accepted batch and queues its jobs."""

    def __init__(self, store: JobStore, batches: BatchStore, queue: BatchQueue) -> None:
        self.store = store
        self.batches = batches
        self.queue = queue
        self.redis = store.redis

    def begin(self, batch: BatchObject, lines: list[BatchLine], jobs: list[Job]) -> None:
        """Store the batch, its lines and its jobs to queue, in one transaction (all of it or nothing)."""
        keep = self.store.retention_seconds + int(max(0, (batch.expires_at or 0) - time.time()))
        pipe = self.redis.pipeline(transaction=True)
        self.batches.stage_batch(pipe, batch)
        self.batches.stage_lines(pipe, batch.id, lines)
        for start in range(0, len(jobs), 500):
            pipe.rpush(_jobs_key(batch.id), *(job.to_json() for job in jobs[start : start + 500]))
        pipe.hset(_state_key(batch.id), mapping={"cursor": 0, "cancelled": 0})
        pipe.expire(_jobs_key(batch.id), keep)
        pipe.expire(_state_key(batch.id), keep)
        pipe.zadd(INTAKES_KEY, {batch.id: time.time()})
        pipe.execute()

    def run(self, batch_id: str) -> int:
        """Queue the batch's jobs not yet queued, a chunk per transaction; once the batch is cancelled,
        count the rest as failed lines instead. Safe to run in several processes at once. The number of
        jobs this call queued."""
        queued = 0
        state, jobs_key = _state_key(batch_id), _jobs_key(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(state)
                    cursor, cancelled = pipe.hmget(state, "cursor", "cancelled")
                    if cursor is None:  # finished (or never begun): nothing left to do
                        pipe.unwatch()
                        self.redis.zrem(INTAKES_KEY, batch_id)
                        return queued
                    cursor, total = int(cursor), pipe.llen(jobs_key)
                    if cursor >= total or cancelled == b"1":
                        unqueued = pipe.lrange(jobs_key, cursor, -1) if cursor < total else []
                        pipe.multi()
                        if cursor < total:  # never queued: they end as failed lines of the cancelled batch
                            pipe.hincrby(batch_key(batch_id), "failed", total - cursor)
                            for raw in unqueued:  # and give back the quota they held
                                stage_release(pipe, Job.from_json(raw), used_tokens=0)
                        pipe.delete(state, jobs_key)
                        pipe.zrem(INTAKES_KEY, batch_id)
                        pipe.execute()
                        if cursor < total:
                            log.info("batch %s: cancelled with %d jobs not queued", batch_id, total - cursor)
                        return queued
                    docs = pipe.lrange(jobs_key, cursor, cursor + CHUNK - 1)
                    pipe.multi()
                    for raw in docs:
                        job = Job.from_json(raw)
                        self.store.stage_new(pipe, job)
                        self.queue.stage_push(pipe, job.model, job.owner, job.id)
                    pipe.hset(state, "cursor", cursor + len(docs))
                    pipe.zadd(INTAKES_KEY, {batch_id: time.time()})
                    pipe.execute()
                    queued += len(docs)
                except redis.WatchError:
                    continue

    def stage_cancel(self, pipe: Any, batch_id: str) -> None:
        """Add the write that stops the intake (if it is still going) to a cancel's transaction."""
        pipe.hset(_state_key(batch_id), "cancelled", 1)
        # An intake that had finished has no state left: the flag written above must not linger for ever.
        pipe.expire(_state_key(batch_id), self.store.retention_seconds)

    def stalled(self, older_than: float) -> list[str]:
        """Batches whose intake made no progress for ``older_than`` seconds (its process died)."""
        cutoff = time.time() - older_than
        return [raw.decode() for raw in self.redis.zrangebyscore(INTAKES_KEY, "-inf", cutoff, start=0, num=100)]

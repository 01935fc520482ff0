"""Getting jobs back on track when something else broke: the worker that ran them died, their message
was lost, or their deadline passed while they waited."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from config.models import queue_for
from jobs.batches import BatchStore
from jobs.intake import BatchIntake
from jobs.queues import BatchQueue
from jobs.schema import Job, JobStatus
from jobs.store import JobStore
from jobs.workers import WorkerDirectory
from worker.liveness import Periodic

log = logging.getLogger(__name__)


class DeadlineExpiry(Periodic):
    """Fails queued jobs whose deadline passed, even when no worker takes them (the store queues their
    ``completed`` webhook with the change)."""

    def __init__(self, store: JobStore, interval: float = 1.0) -> None:
        super().__init__("bloomq-deadlines", interval, self._reap)
        self.store = store

    def _reap(self) -> None:
        for job_id in self.store.expire_overdue():
            log.info("job %s: expired while queued", job_id)


class OrphanRecovery(Periodic):
    """Requeues running jobs whose worker stopped announcing itself (crashed, killed, cut off), fails jobs
    stuck far past their deadline, and re-sends jobs whose message was lost.

    This is what brings a dead worker's jobs back within seconds; Celery's own redelivery only comes
    after the visibility timeout, which must stay longer than the longest job.

    A Redis pause or outage looks, from inside, exactly like every worker dying: heartbeats expire while
    nobody can refresh them. So it judges other workers dead only once it has itself been connected to
    Redis without a break for longer than a heartbeat's lifetime (``trust_after``), by when every live
    worker has announced itself again; and it never takes its own process's jobs.
    """

    def __init__(
        self,
        store: JobStore,
        directory: WorkerDirectory,
        requeue: Callable[[Job], None],
        interval: float,
        instance: str,
        trust_after: float,
        stuck_grace: float = 120.0,
        lost_delivery_after: float = 30.0,
        intake_stall_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("bloomq-orphans", interval, self._reap)
        self.store = store
        self.batch_queue = BatchQueue(store.redis)
        self.intake = BatchIntake(store, BatchStore(store.redis, store.retention_seconds), self.batch_queue)
        self.intake_stall_seconds = intake_stall_seconds
        self.directory = directory
        self.requeue = requeue
        self.instance = instance
        self.trust_after = trust_after
        self.stuck_grace = stuck_grace
        self.lost_delivery_after = lost_delivery_after
        self._clock = clock
        self._connected_since: float | None = None

    def _reap(self) -> None:
        asked = self._clock()
        try:
            self.store.redis.ping()
        except redis.RedisError:
            self._connected_since = None
            raise
        now = self._clock()
        if self._connected_since is None or now - asked > self.interval:
            self._connected_since = now  # (a slow answer is a break too: Redis was paused, say)
        if now - self._connected_since <= self.trust_after:
            return  # heartbeats may still be catching up after a break: judge nobody yet
        try:
            self._recover()
        except redis.RedisError:
            self._connected_since = None
            raise

    def _recover(self) -> None:
        live_workers = self.directory.live()
        self._resend_lost_deliveries({w.model for w in live_workers})
        live = {w.instance for w in live_workers} | {self.instance}
        self._return_batch_lines(live)
        self._finish_stalled_intakes()
        running = self.store.running_jobs()
        if not running:
            return
        for job_id in running:
            job = self.store.requeue_if_orphaned(job_id, live)
            if job is not None:
                self.requeue(job)
                continue
            # A live worker stops a job at its deadline itself; one still running well past it is stuck.
            stuck = self.store.fail_if_stuck(job_id, grace_seconds=self.stuck_grace)
            if stuck is not None:
                log.error("job %s: still running %ds past its deadline; failed", job_id, self.stuck_grace)

    def _return_batch_lines(self, live: set[str]) -> None:
        """Put back the batch lines a dead worker had taken and not started (running ones come back as
        orphans); each comes back once, however many reapers look at the same time."""
        for instance in self.batch_queue.dead_takers(live):
            for job_id in self.batch_queue.return_taken(instance):
                log.warning("job %s: batch line taken by %s, which is gone; put back", job_id, instance)

    def _finish_stalled_intakes(self) -> None:
        """Finish queuing batches whose web process died while it queued them."""
        for batch_id in self.intake.stalled(self.intake_stall_seconds):
            queued = self.intake.run(batch_id)
            log.warning("batch %s: its queuing had stalled; finished it (%d jobs queued)", batch_id, queued)

    def _resend_lost_deliveries(self, live_models: set[str]) -> None:
        """Send the jobs a failing worker handed back (they have no message), and re-send interactive jobs
        whose message went to a worker that died before starting them.

        A worker takes a message and marks the job running within milliseconds; a job still queued long
        after, while its model's queue is empty and a worker for it is live, had its message taken by a
        worker that died in between (the message waits in Redis's unacknowledged set until the
        visibility timeout). Only the models with a live worker are looked at, in an index of their
        interactive jobs alone, so a big batch or a model nobody serves cannot hide a lost job. Of
        several reapers that find the same job, one claims the re-send; the store lets only one attempt
        finish it anyway.
        """
        for model in sorted(live_models):
            for job_id in self.store.to_send_now(model):
                job = self.store.get(job_id)
                if job is not None and job.status is JobStatus.QUEUED and self.store.claim_send_now(model, job_id):
                    log.warning("job %s: handed back by a worker whose device failed; sending it", job_id)
                    self.requeue(job)
            stale = self.store.stale_queued(model, self.lost_delivery_after)
            if not stale or self.store.redis.llen(queue_for(model)) > 0:
                continue  # nothing waiting that long, or its message may simply be waiting in the queue
            for job_id in stale:
                job = self.store.get(job_id)
                if job is None or job.status is not JobStatus.QUEUED:
                    continue
                if self.store.claim_resend(model, job_id, self.lost_delivery_after):
                    log.warning("job %s: queued %ds with an empty queue; its delivery was lost, re-sending",
                                job_id, self.lost_delivery_after)
                    self.requeue(job)

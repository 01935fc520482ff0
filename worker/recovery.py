"""Getting jobs back on track when something else broke: the worker that ran them died, their message
was lost, or their deadline passed while they waited."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from jobs.batches import BatchQueue
from jobs.schema import Job, JobStatus
from jobs.store import JobStore
from jobs.workers import WorkerDirectory
from worker.liveness import Periodic

log = logging.getLogger(__name__)


class DeadlineExpiry(Periodic):
    """Fails queued jobs whose deadline passed, even when no worker takes them."""

    def __init__(self, store: JobStore, on_expired: Callable[[str], None], interval: float = 1.0) -> None:
        super().__init__("bloomq-deadlines", interval, self._reap)
        self.store = store
        self.on_expired = on_expired

    def _reap(self) -> None:
        for job_id in self.store.expire_overdue():
            log.info("job %s: expired while queued", job_id)
            self.on_expired(job_id)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("bloomq-orphans", interval, self._reap)
        self.store = store
        self.batch_queue = BatchQueue(store.redis)
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
        self._resend_lost_deliveries()
        live = {w.instance for w in self.directory.live()} | {self.instance}
        self._return_batch_lines(live)
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
        """Put back the batch lines a dead worker had taken and not finished (still queued: never started;
        running ones come back as orphans)."""
        for instance, job_ids in self.batch_queue.taken_by_the_dead(live).items():
            for job_id in job_ids:
                job = self.store.get(job_id)
                if job is not None and job.status is JobStatus.QUEUED:
                    log.warning("job %s: batch line taken by %s, which is gone; putting it back", job_id, instance)
                    self.requeue(job)
            self.batch_queue.forget_taken(instance)

    def _resend_lost_deliveries(self) -> None:
        """Re-send jobs whose message went to a worker that died before starting them.

        A worker takes a message and marks the job running within milliseconds; a job still queued long
        after, while its model's queue is empty and a worker for it is live, had its message taken by a
        worker that died in between (the message waits in Redis's unacknowledged set until the
        visibility timeout). Sending it again is safe: the store lets only one attempt finish it.
        """
        stale = self.store.stale_queued(self.lost_delivery_after)
        if not stale:
            return
        live_models = {w.model for w in self.directory.live()}
        empty_queues: dict[str, bool] = {}
        for job_id in stale:
            job = self.store.get(job_id)
            if job is None or job.status is not JobStatus.QUEUED or job.model not in live_models:
                continue
            if job.priority_class == "batch":
                continue  # batch lines wait in their own lists, and come back through _return_batch_lines
            queue = job.queue
            if queue not in empty_queues:
                empty_queues[queue] = self.store.redis.llen(queue) == 0
            if empty_queues[queue]:
                log.warning("job %s: queued %ds with an empty queue; its delivery was lost, re-sending",
                            job_id, self.lost_delivery_after)
                self.store.mark_resent(job_id)
                self.requeue(job)

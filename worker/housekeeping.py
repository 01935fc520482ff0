"""Background threads of a worker process: heartbeat, cancel listener, deadline reaper."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from config.models import queue_for
from jobs.schema import Job, JobStatus
from jobs.store import CANCEL_CHANNEL, JobStore
from jobs.workers import WorkerDirectory, WorkerInfo

log = logging.getLogger(__name__)


class _Loop:
    """A daemon thread running ``tick`` every ``interval`` seconds until stopped; errors are logged."""

    def __init__(self, name: str, interval: float, tick: Callable[[], None]) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.warning("%s failed; retrying", self._thread.name, exc_info=True)
            self._stop.wait(self.interval)


class Heartbeat(_Loop):
    """Refreshes this worker's announcement in Redis until stopped, then withdraws it."""

    def __init__(self, directory: WorkerDirectory, info: Callable[[], WorkerInfo], interval: float) -> None:
        self.directory = directory
        self.info = info
        self.instance = info().instance
        super().__init__("bloomq-heartbeat", interval, lambda: directory.announce(info(), ttl_seconds=interval * 3))

    def stop(self) -> None:
        super().stop()
        try:
            self.directory.withdraw(self.instance)
        except redis.RedisError:  # Redis may be the reason we are stopping
            log.warning("could not withdraw worker record %s", self.instance)


class DeadlineReaper(_Loop):
    """Fails queued jobs whose deadline passed, even when no worker takes them."""

    def __init__(self, store: JobStore, on_expired: Callable[[str], None], interval: float = 1.0) -> None:
        super().__init__("bloomq-deadlines", interval, self._reap)
        self.store = store
        self.on_expired = on_expired

    def _reap(self) -> None:
        for job_id in self.store.expire_overdue():
            log.info("job %s: expired while queued", job_id)
            self.on_expired(job_id)


class CancelListener:
    """Forwards cancel requests published on Redis to the jobs this process is running."""

    def __init__(self, client: redis.Redis, cancel: Callable[[str], bool]) -> None:
        self.client = client
        self.cancel = cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bloomq-cancels", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        job_id = message["data"].decode()
                        if self.cancel(job_id):
                            log.info("job %s: cancel requested; stopping it", job_id)
            except redis.RedisError:
                log.warning("cancel listener lost Redis; reconnecting")
                self._stop.wait(1.0)
            finally:
                pubsub.close()


STUCK_GRACE = 120  # seconds past its deadline after which a running job is failed as stuck


LOST_DELIVERY_AFTER = 30  # seconds a job may stay queued, with its queue empty, before its message is re-sent


class Reaper(_Loop):
    """Requeues running jobs whose worker stopped announcing itself (crashed, killed, cut off).

    This is what brings a dead worker's jobs back within seconds; Celery's own redelivery only comes
    after the visibility timeout, which must stay longer than the longest job.
    """

    def __init__(self, store: JobStore, directory: WorkerDirectory, requeue: Callable[[Job], None],
                 interval: float) -> None:
        super().__init__("bloomq-reaper", interval, self._reap)
        self.store = store
        self.directory = directory
        self.requeue = requeue

    def _reap(self) -> None:
        self._resend_lost_deliveries()
        running = self.store.running_jobs()
        if not running:
            return
        live = {w.instance for w in self.directory.live()}
        for job_id in running:
            job = self.store.requeue_if_orphaned(job_id, live)
            if job is not None:
                self.requeue(job)
                continue
            # A live worker stops a job at its deadline itself; one still running well past it is stuck.
            stuck = self.store.fail_if_stuck(job_id, grace_seconds=STUCK_GRACE)
            if stuck is not None:
                log.error("job %s: still running %ds past its deadline; failed", job_id, STUCK_GRACE)

    def _resend_lost_deliveries(self) -> None:
        """Re-send jobs whose message went to a worker that died before starting them.

        A worker takes a message and marks the job running within milliseconds; a job still queued long
        after, while its model's queue is empty and a worker for it is live, had its message taken by a
        worker that died in between (the message waits in Redis's unacknowledged set until the
        visibility timeout). Sending it again is safe: the store lets only one attempt finish it.
        """
        stale = self.store.stale_queued(LOST_DELIVERY_AFTER)
        if not stale:
            return
        live_models = {w.model for w in self.directory.live()}
        empty_queues: dict[str, bool] = {}
        for job_id in stale:
            job = self.store.get(job_id)
            if job is None or job.status is not JobStatus.QUEUED or job.model not in live_models:
                continue
            queue = queue_for(job.model)
            if queue not in empty_queues:
                empty_queues[queue] = self.store.redis.llen(queue) == 0
            if empty_queues[queue]:
                log.warning("job %s: queued %ds with an empty queue; its delivery was lost, re-sending",
                            job_id, LOST_DELIVERY_AFTER)
                self.store.mark_resent(job_id)
                self.requeue(job)

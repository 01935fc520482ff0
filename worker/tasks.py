"""The Celery task (thin: it unpacks a job id and hands the job to the runner) and the webhook dispatcher,
which drains the webhook outbox beside it."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import redis
from celery import Celery

from config.logs import job_context
from jobs.celery_app import TASK_GENERATE
from jobs.outbox import MAX_ATTEMPTS, Claim, Delivery, Outbox, retry_delay
from worker.runner import JobRunner

log = logging.getLogger(__name__)
_LAPSED = "webhook %s: the claim lapsed before the attempt ended; another worker holds it now"


class Sender(Protocol):
    def deliver(self, delivery: Delivery) -> None: ...


class WebhookDispatcher:
    """Claims due webhook deliveries from the outbox and makes them on a small pool of its own threads,
    never on the threads that feed the batch, so a slow or dead receiver cannot hold up generation.

    It claims only as many deliveries as it has idle threads, so each starts as soon as it is claimed and
    ends (its deadline) well inside its lease; a failed one is made due again 2, 4, 8, 16 s later.
    """

    def __init__(self, outbox: Outbox, sender: Sender, threads: int, lease_seconds: float,
                 poll_seconds: float = 0.5) -> None:
        self.outbox = outbox
        self.sender = sender
        self.threads = threads
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self._idle = threading.Semaphore(threads)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bloomq-webhook")
        self._thread = threading.Thread(target=self._run, name="bloomq-webhook-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Claim no more; let the deliveries under way finish (each within its deadline)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)

    def dispatch_due(self) -> int:
        """Claim due deliveries, one per idle thread, and start them; how many were claimed."""
        if not self._idle.acquire(timeout=self.poll_seconds):
            return 0
        slots = 1
        while slots < self.threads and self._idle.acquire(blocking=False):
            slots += 1
        try:
            claims = self.outbox.claim(slots, self.lease_seconds)
        except BaseException:
            for _ in range(slots):
                self._idle.release()
            raise
        for _ in range(slots - len(claims)):
            self._idle.release()
        for claim in claims:
            self._pool.submit(self._deliver_on_thread, claim)
        return len(claims)

    def deliver(self, claim: Claim) -> None:
        """One attempt at a claimed delivery: removed on success, made due again on failure, dropped after
        the last attempt."""
        delivery = claim.delivery
        with job_context(delivery.job_id):
            if delivery.attempt > MAX_ATTEMPTS:  # earlier claims lapsed (their claimers died) and counted
                log.error("job %s: %s webhook %s given up after %d attempts", delivery.job_id, delivery.event,
                          delivery.id, MAX_ATTEMPTS)
                self.outbox.complete(claim)
                return
            try:
                self.sender.deliver(delivery)
            except Exception as exc:
                if delivery.attempt >= MAX_ATTEMPTS:
                    log.error("job %s: %s webhook %s failed for good after %d attempts: %s", delivery.job_id,
                              delivery.event, delivery.id, delivery.attempt, exc)
                    self.outbox.complete(claim)
                    return
                delay = retry_delay(delivery.attempt)
                log.warning("job %s: %s webhook %s failed (attempt %d: %s); retry in %ds", delivery.job_id,
                            delivery.event, delivery.id, delivery.attempt, exc, delay)
                if not self.outbox.retry(claim, delay):
                    log.warning(_LAPSED, delivery.id)
                return
            if not self.outbox.complete(claim):
                log.warning(_LAPSED, delivery.id)

    def _deliver_on_thread(self, claim: Claim) -> None:
        try:
            self.deliver(claim)
        except redis.RedisError:
            # The claim lapses and the delivery comes back: at least once, never lost.
            log.warning("webhook %s: Redis unavailable to record the attempt", claim.delivery.id, exc_info=True)
        except Exception:
            log.exception("webhook %s: the attempt broke", claim.delivery.id)
        finally:
            self._idle.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.dispatch_due()
            except redis.RedisError:
                log.warning("webhook outbox unavailable; retrying", exc_info=True)
                claimed = 0
            if not claimed:
                self._stop.wait(self.poll_seconds)


def register_tasks(app: Celery, runner: JobRunner) -> None:
    """Bind the task to ``runner`` in this process."""

    @app.task(name=TASK_GENERATE, ignore_result=True)
    def generate(job_id: str) -> None:
        if not isinstance(job_id, str):
            raise TypeError(f"generate expects a job id string, got {type(job_id).__name__}")
        with job_context(job_id):
            runner.run(job_id)

"""The Celery tasks: thin. They unpack a job id and hand the job to the runner or the webhook sender."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from dataclasses import dataclass
from datetime import datetime

import redis
from celery import Celery

from config.logs import job_context
from jobs.celery_app import TASK_GENERATE, TASK_WEBHOOK, WEBHOOK_RETRIES, send_webhook
from jobs.schema import FinishReason, Job, JobError, JobOutput, JobStatus, utcnow
from jobs.store import JobStore, ProgressUpdate
from jobs.webhooks import WebhookSender
from worker.batch import Sequence
from worker.engine import Engine, GenerationError

log = logging.getLogger(__name__)
T = TypeVar("T")

STREAM_INTERVAL = 0.1  # seconds between token events on a job's stream
PROGRESS_INTERVAL = 0.25  # seconds between partial-output writes to the job record


@dataclass
class _Followed:
    seq: Sequence
    attempt: int
    sent: str = ""
    last_progress: float = 0.0


class ProgressPublisher:
    """One thread per worker process that streams every running job's new text and progress.

    Every ``STREAM_INTERVAL`` it decodes what each running sequence has generated, appends the new text
    to the jobs' event streams and, every ``PROGRESS_INTERVAL``, their partial outputs to the records --
    all in one Redis round trip, and without a thread or a write per token.
    """

    def __init__(self, store: JobStore, engine: Engine, on_cancel) -> None:
        self.store = store
        self.engine = engine
        self.on_cancel = on_cancel
        self._followed: dict[str, _Followed] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def follow(self, job_id: str, seq: Sequence, attempt: int) -> None:
        """Start publishing ``seq``'s progress as attempt ``attempt`` of ``job_id``."""
        with self._lock:
            self._followed[job_id] = _Followed(seq, attempt, last_progress=time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bloomq-progress", daemon=True)
                self._thread.start()

    def forget(self, job_id: str) -> None:
        """Publish the job's last text and stop following it (before its final result is stored)."""
        with self._lock:
            followed = self._followed.pop(job_id, None)
            if followed is not None and followed.seq.error is None:
                final = followed.seq.text
                if len(final) > len(followed.sent) and final.startswith(followed.sent):
                    delta = final[len(followed.sent) :]
                    try:
                        update = ProgressUpdate(job_id, delta, len(followed.seq.tokens), attempt=followed.attempt)
                        self.store.publish_progress([update])
                    except redis.RedisError:  # the final result still carries the whole text
                        log.warning("job %s: could not stream its last text", job_id)

    def _run(self) -> None:
        while True:
            time.sleep(STREAM_INTERVAL)
            try:
                self._tick()
            except Exception:
                log.warning("progress publishing failed; retrying", exc_info=True)

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            updates = []
            for job_id, followed in self._followed.items():
                seq = followed.seq
                text = self.engine.partial_text(seq)
                delta = text[len(followed.sent) :] if text.startswith(followed.sent) else ""
                output = None
                if now - followed.last_progress >= PROGRESS_INTERVAL:
                    output = JobOutput(generated_text=text, generated_tokens=len(seq.tokens), seed=seq.sampling.seed)
                if delta or output is not None:
                    update = ProgressUpdate(job_id, delta, len(seq.tokens), output, attempt=followed.attempt)
                    updates.append((followed, text, update))
            cancel = self.store.publish_progress([update for _, _, update in updates])
            # Only now that Redis has the text does it count as sent (a failed write is retried next tick).
            for followed, text, update in updates:
                followed.sent = text if update.delta else followed.sent
                if update.output is not None:
                    followed.last_progress = now
        for job_id in cancel:
            self.on_cancel(job_id)


class JobRunner:
    """Moves one job through the store around the engine: start, progress, cancel, final result."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        worker_name: str,
        celery: Celery | None = None,
        live_workers: Callable[[], set[str]] | None = None,
        instance: str | None = None,
    ) -> None:
        self.store = store
        self.live_workers = live_workers  # live worker instances
        self.instance = instance or worker_name
        self.engine = engine
        self.worker_name = worker_name
        self.celery = celery
        self._running: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self.publisher = ProgressPublisher(store, engine, on_cancel=self.cancel)

    def run(self, job_id: str) -> None:
        """Run a queued (or redelivered) job; skip one that already has its final result."""
        current = self.store.get(job_id)
        with self._lock:
            running_here = job_id in self._running
        if running_here or (
            current is not None
            and current.status is JobStatus.RUNNING
            and current.worker_instance not in (None, self.instance)
            and self.live_workers is not None
            and current.worker_instance in self.live_workers()
        ):
            # A duplicate delivery while its worker is alive and working on it: leave it there. Should
            # that worker die, the reaper requeues the job.
            log.info("job %s: already running on live worker %s; message acknowledged", job_id,
                     current.worker_instance)
            return
        job = self.store.start(job_id, self.worker_name, self.instance)
        if job is None or job.status is not JobStatus.RUNNING:
            reason = "unknown, expired or already finished" if job is None else f"{job.status.value} before it ran"
            log.info("job %s: %s; message acknowledged", job_id, reason)
            if job is not None:
                self._notify(job, "completed")
            return
        attempt = job.attempts  # our fencing token: results of a stale attempt are refused by the store
        log.info("job %s: started (attempt %d)", job_id, attempt)
        self._notify(job, "started")
        try:
            self._run_attempt(job, attempt)
        except Exception as exc:
            # Whatever went wrong, the job must not stay "running" on a live worker.
            log.exception("job %s: attempt %d broke", job_id, attempt)
            error = JobError(type="internal_error", message=f"{type(exc).__name__}: {exc}")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))

    def _run_attempt(self, job: Job, attempt: int) -> None:
        job_id = job.id
        if job.cancel_requested:
            empty = JobOutput(generated_text="", generated_tokens=0, finish_reason=FinishReason.CANCELED)
            self._finish(job_id, attempt, FinishReason.CANCELED, empty, 0.0)
            return
        try:
            seq = self.engine.submit(job.inputs, job.parameters, timeout=_seconds_left(job.deadline))
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            error = JobError(type=exc.type, message=str(exc))
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))
            return
        with self._lock:
            self._running[job_id] = seq
        self.publisher.follow(job_id, seq, attempt)
        try:
            seq.done.wait()
        finally:
            self.publisher.forget(job_id)  # flushes the last text before the final result is stored
            with self._lock:
                self._running.pop(job_id, None)
        try:
            result = self.engine.result(seq)
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            error = JobError(type=exc.type, message=str(exc))
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))
            return
        except Exception as exc:  # the job fails alone; the worker keeps serving
            log.error("job %s: generation raised %s: %s", job_id, type(exc).__name__, exc)
            error_type = "out_of_memory" if "out of memory" in str(exc).lower() else "internal_error"
            error = JobError(type=error_type, message=f"{type(exc).__name__}: {exc}")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))
            return
        self._finish(job_id, attempt, result.output.finish_reason, result.output, round(result.seconds, 6))

    def notify_expired(self, job_id: str) -> None:
        """A queued job expired without running: send its completed webhook."""
        job = self.store.get(job_id)
        if job is not None:
            self._notify(job, "completed")

    def cancel(self, job_id: str) -> bool:
        """Stop a job this process is running; False when it is not running here."""
        with self._lock:
            seq = self._running.get(job_id)
        if seq is None:
            return False
        self.engine.cancel(seq)
        return True

    def _finish(
        self, job_id: str, attempt: int, reason: FinishReason | None, output: JobOutput, seconds: float
    ) -> None:
        if reason is FinishReason.CANCELED:
            self._store_final(job_id, lambda: self.store.finish_canceled(job_id, output, seconds, attempt=attempt))
        elif reason is FinishReason.TIMEOUT:
            error = JobError(type="timeout", message="the job reached its deadline while running")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, seconds, output=output, attempt=attempt))
        else:
            self._store_final(job_id, lambda: self.store.succeed(job_id, output, seconds, attempt=attempt))

    def _store_final(self, job_id: str, write) -> None:
        job: Job | None = _until_redis_answers(write, f"job {job_id}: storing the result")
        if job is None:
            log.warning("job %s: not stored: it was finished or taken over elsewhere first", job_id)
            return
        output = job.output
        log.info(
            "job %s: %s, %d tokens (%s)",
            job_id,
            job.status.value,
            output.generated_tokens if output else 0,
            output.finish_reason.value if output and output.finish_reason else (job.error.type if job.error else "-"),
        )
        self._notify(job, "completed")

    def _notify(self, job: Job, event: str) -> None:
        if self.celery is not None and job.webhook and event in job.webhook_events:
            try:
                send_webhook(self.celery, job.id, event)
            except Exception:  # a webhook never holds up or fails a job
                log.warning("job %s: could not queue the %s webhook", job.id, event, exc_info=True)


REDIS_PATIENCE = 600.0  # seconds a finished job's result waits for Redis to come back


def _until_redis_answers(write: Callable[[], T], what: str) -> T:
    """Run ``write``, retrying while Redis is unreachable (a restart, a network blip): a finished job's
    result is not thrown away because Redis was down for a moment."""
    delay, waited = 0.2, 0.0
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if waited >= REDIS_PATIENCE:
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


def _seconds_left(deadline: datetime | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, (deadline - utcnow()).total_seconds())


def register_tasks(app: Celery, runner: JobRunner, sender: WebhookSender) -> None:
    """Bind the tasks to ``runner`` and ``sender`` in this process."""

    @app.task(name=TASK_GENERATE, ignore_result=True)
    def generate(job_id: str) -> None:
        if not isinstance(job_id, str):
            raise TypeError(f"generate expects a job id string, got {type(job_id).__name__}")
        with job_context(job_id):
            runner.run(job_id)

    @app.task(name=TASK_WEBHOOK, bind=True, ignore_result=True, max_retries=WEBHOOK_RETRIES)
    def webhook(self, job_id: str, event: str) -> None:
        try:
            with job_context(job_id):
                sender.deliver(job_id, event)
        except Exception as exc:
            if self.request.retries >= WEBHOOK_RETRIES:
                log.error("job %s: %s webhook failed for good: %s", job_id, event, exc)
                return
            delay = 2 ** (self.request.retries + 1)
            log.warning("job %s: %s webhook failed (%s); retry in %ds", job_id, event, exc, delay)
            raise self.retry(countdown=delay) from exc

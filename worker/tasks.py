"""The Celery tasks: thin. They unpack a job id and hand the job to the runner or the webhook sender."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from celery import Celery

from jobs.celery_app import TASK_GENERATE, TASK_WEBHOOK, WEBHOOK_RETRIES, send_webhook
from jobs.schema import FinishReason, Job, JobError, JobOutput, JobStatus, utcnow
from jobs.store import JobStore
from jobs.webhooks import WebhookSender
from worker.batch import Sequence
from worker.engine import Engine, GenerationError

log = logging.getLogger(__name__)

STREAM_INTERVAL = 0.05  # seconds between token events on a job's stream
PROGRESS_INTERVAL = 0.25  # seconds between partial-output writes to the job record


class JobRunner:
    """Moves one job through the store around the engine: start, progress, cancel, final result."""

    def __init__(self, store: JobStore, engine: Engine, worker_name: str, celery: Celery | None = None) -> None:
        self.store = store
        self.engine = engine
        self.worker_name = worker_name
        self.celery = celery
        self._running: dict[str, Sequence] = {}
        self._lock = threading.Lock()

    def run(self, job_id: str) -> None:
        """Run a queued (or redelivered) job; skip one that already has its final result."""
        job = self.store.start(job_id, self.worker_name)
        if job is None or job.status is not JobStatus.RUNNING:
            reason = "unknown, expired or already finished" if job is None else f"{job.status.value} before it ran"
            log.info("job %s: %s; message acknowledged", job_id, reason)
            if job is not None:
                self._notify(job, "completed")
            return
        log.info("job %s: started (attempt %d)", job_id, job.attempts)
        self._notify(job, "started")
        if job.cancel_requested:
            self._finish(job_id, FinishReason.CANCELED, JobOutput(generated_text="", generated_tokens=0,
                                                                  finish_reason=FinishReason.CANCELED), 0.0)
            return
        try:
            seq = self.engine.submit(job.inputs, job.parameters, timeout=_seconds_left(job.deadline))
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            self._store_final(job_id, lambda: self.store.fail(job_id, JobError(type=exc.type, message=str(exc))))
            return
        with self._lock:
            self._running[job_id] = seq
        try:
            self._follow(job_id, seq)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        try:
            result = self.engine.result(seq)
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            self._store_final(job_id, lambda: self.store.fail(job_id, JobError(type=exc.type, message=str(exc))))
            return
        except Exception as exc:  # the job fails alone; the worker keeps serving
            log.error("job %s: generation raised %s: %s", job_id, type(exc).__name__, exc)
            error_type = "out_of_memory" if "out of memory" in str(exc).lower() else "internal_error"
            error = JobError(type=error_type, message=f"{type(exc).__name__}: {exc}")
            self._store_final(job_id, lambda: self.store.fail(job_id, error))
            return
        self._finish(job_id, result.output.finish_reason, result.output, round(result.seconds, 6))

    def cancel(self, job_id: str) -> bool:
        """Stop a job this process is running; False when it is not running here."""
        with self._lock:
            seq = self._running.get(job_id)
        if seq is None:
            return False
        self.engine.cancel(seq)
        return True

    def _follow(self, job_id: str, seq: Sequence) -> None:
        """While the engine works: stream new text, write progress, watch for a cancel request."""
        sent = ""
        last_progress = time.monotonic()
        while not seq.done.wait(STREAM_INTERVAL):
            text = self.engine.partial_text(seq)
            if len(text) > len(sent) and text.startswith(sent):
                self.store.append_text(job_id, text[len(sent) :], len(seq.tokens))
                sent = text
            if time.monotonic() - last_progress >= PROGRESS_INTERVAL:
                last_progress = time.monotonic()
                partial = JobOutput(generated_text=text, generated_tokens=len(seq.tokens), seed=seq.sampling.seed)
                job = self.store.progress(job_id, partial)
                if job is not None and job.cancel_requested:
                    self.engine.cancel(seq)
        final = seq.text
        if seq.error is None and len(final) > len(sent) and final.startswith(sent):
            self.store.append_text(job_id, final[len(sent) :], len(seq.tokens))

    def _finish(self, job_id: str, reason: FinishReason | None, output: JobOutput, seconds: float) -> None:
        if reason is FinishReason.CANCELED:
            self._store_final(job_id, lambda: self.store.finish_canceled(job_id, output, seconds))
        elif reason is FinishReason.TIMEOUT:
            error = JobError(type="timeout", message="the job reached its deadline while running")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, seconds, output=output))
        else:
            self._store_final(job_id, lambda: self.store.succeed(job_id, output, seconds))

    def _store_final(self, job_id: str, write) -> None:
        job: Job | None = write()
        if job is None:
            log.warning("job %s: finished elsewhere first; this result was dropped", job_id)
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
        runner.run(job_id)

    @app.task(name=TASK_WEBHOOK, bind=True, ignore_result=True, max_retries=WEBHOOK_RETRIES)
    def webhook(self, job_id: str, event: str) -> None:
        try:
            sender.deliver(job_id, event)
        except Exception as exc:
            if self.request.retries >= WEBHOOK_RETRIES:
                log.error("job %s: %s webhook failed for good: %s", job_id, event, exc)
                return
            delay = 2 ** (self.request.retries + 1)
            log.warning("job %s: %s webhook failed (%s); retry in %ds", job_id, event, exc, delay)
            raise self.retry(countdown=delay) from exc

"""The Celery tasks: thin. They unpack a job id and hand the job to the runner or the webhook dispatcher."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from celery import Celery

from config.logs import job_context
from jobs.celery_app import TASK_GENERATE, TASK_WEBHOOK, WEBHOOK_RETRIES, send_webhook
from jobs.webhooks import WebhookSender
from worker.runner import JobRunner

log = logging.getLogger(__name__)


class WebhookDispatcher:
    """Delivers webhooks on a small thread pool of its own, so a slow receiver never holds a thread of
    the Celery pool (those threads feed the batch). A failed delivery is queued again, with a delay."""

    def __init__(self, app: Celery, sender: WebhookSender, threads: int) -> None:
        self.app = app
        self.sender = sender
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bloomq-webhook")

    def submit(self, job_id: str, event: str, attempt: int) -> None:
        """Deliver in the background; the calling (Celery) thread returns at once."""
        self._pool.submit(self.deliver, job_id, event, attempt)

    def deliver(self, job_id: str, event: str, attempt: int) -> None:
        """One delivery attempt; on failure, the next one is queued 2, 4, 8, 16 s later."""
        with job_context(job_id):
            try:
                self.sender.deliver(job_id, event)
            except Exception as exc:
                if attempt >= WEBHOOK_RETRIES:
                    log.error("job %s: %s webhook failed for good: %s", job_id, event, exc)
                    return
                delay = 2 ** (attempt + 1)
                log.warning("job %s: %s webhook failed (%s); retry in %ds", job_id, event, exc, delay)
                try:
                    send_webhook(self.app, job_id, event, attempt=attempt + 1, countdown=delay)
                except Exception:
                    log.error("job %s: could not queue the %s webhook's retry", job_id, event, exc_info=True)

    def shutdown(self) -> None:
        """Finish the deliveries under way."""
        self._pool.shutdown(wait=True)


def register_tasks(app: Celery, runner: JobRunner, webhooks: WebhookDispatcher) -> None:
    """Bind the tasks to ``runner`` and ``webhooks`` in this process."""

    @app.task(name=TASK_GENERATE, ignore_result=True)
    def generate(job_id: str) -> None:
        if not isinstance(job_id, str):
            raise TypeError(f"generate expects a job id string, got {type(job_id).__name__}")
        with job_context(job_id):
            runner.run(job_id)

    @app.task(name=TASK_WEBHOOK, ignore_result=True)
    def webhook(job_id: str, event: str, attempt: int = 0) -> None:
        webhooks.submit(job_id, event, attempt)

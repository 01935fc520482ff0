"""The Celery task: thin. It unpacks a job id and hands the job to the runner."""

from __future__ import annotations

import logging

from celery import Celery

from jobs.celery_app import TASK_GENERATE
from jobs.schema import JobError
from jobs.store import JobStore
from worker.engine import Engine, GenerationError

log = logging.getLogger(__name__)


class JobRunner:
    """Moves one job through the store around a call to the engine."""

    def __init__(self, store: JobStore, engine: Engine, worker_name: str) -> None:
        self.store = store
        self.engine = engine
        self.worker_name = worker_name

    def run(self, job_id: str) -> None:
        """Run a queued (or redelivered) job; skip one that already has its final result."""
        job = self.store.start(job_id, self.worker_name)
        if job is None:
            log.info("job %s: unknown, expired or already finished; message acknowledged", job_id)
            return
        log.info("job %s: started (attempt %d)", job_id, job.attempts)
        try:
            result = self.engine.generate(job.inputs, job.parameters)
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            self.store.fail(job_id, JobError(type=exc.type, message=str(exc)))
            return
        except Exception as exc:  # the job fails alone; the worker keeps serving
            log.exception("job %s: generation raised", job_id)
            error_type = "out_of_memory" if "out of memory" in str(exc).lower() else "internal_error"
            self.store.fail(job_id, JobError(type=error_type, message=f"{type(exc).__name__}: {exc}"))
            return
        if self.store.succeed(job_id, result.output, round(result.seconds, 6)) is None:
            log.warning("job %s: finished elsewhere first; this result was dropped", job_id)
        else:
            log.info(
                "job %s: succeeded, %d tokens in %.3fs (%s)",
                job_id,
                result.output.generated_tokens,
                result.seconds,
                result.output.finish_reason.value if result.output.finish_reason else "?",
            )


def register_tasks(app: Celery, runner: JobRunner) -> None:
    """Bind the generate task to ``runner`` in this process."""

    @app.task(name=TASK_GENERATE, ignore_result=True)
    def generate(job_id: str) -> None:
        if not isinstance(job_id, str):
            raise TypeError(f"generate expects a job id string, got {type(job_id).__name__}")
        runner.run(job_id)

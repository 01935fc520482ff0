"""What the web does with jobs: validate against the registry, store, queue, read back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery

from config.models import ModelRegistry, ModelSpec
from config.settings import Settings
from jobs.celery_app import send_generate
from jobs.schema import Job, JobRequest, new_job_id
from jobs.store import JobStore
from jobs.workers import WorkerDirectory, WorkerInfo
from web.errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class JobService:
    """The web side of the data path: form/REST -> store + Celery send; store -> poll."""

    settings: Settings
    registry: ModelRegistry
    store: JobStore
    directory: WorkerDirectory
    celery: Celery

    def submit(self, request: JobRequest) -> Job:
        """Validate ``request`` against its model, store it queued and send it to the model's queue."""
        spec = self._model_for(request.model)
        params = request.parameters.normalised(self.settings.default_max_new_tokens)
        _check_limits(spec, params.max_new_tokens, params.max_length)
        job = Job(id=new_job_id(), model=spec.name, inputs=request.inputs, parameters=params)
        self.store.create(job)
        try:
            send_generate(self.celery, job.id, spec.queue)
        except Exception:
            # Nothing half-written: a job that could not be queued is not left behind as "queued".
            self.store.delete(job.id)
            raise
        log.info("job %s: queued for %s", job.id, spec.name)
        return job

    def get(self, job_id: str) -> Job:
        """The job, or a 404 ApiError."""
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired after retention)")
        return job

    def wait(self, job_id: str, seconds: float) -> Job:
        """The job once final, or after ``seconds``; a 404 ApiError when unknown."""
        job = self.store.wait(job_id, seconds)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired after retention)")
        return job

    def models(self) -> list[dict[str, Any]]:
        """Configured models (and any other model with live workers), with queue depth and live workers."""
        live = self.directory.live()
        specs: dict[str, ModelSpec] = {spec.name: spec for spec in self.registry.configured}
        for worker in live:
            spec = self.registry.get(worker.model)
            if spec is not None:
                specs.setdefault(spec.name, spec)
        pipe = self.store.redis.pipeline(transaction=False)
        for spec in specs.values():
            pipe.llen(spec.queue)
        depths = pipe.execute()
        return [
            {
                "name": spec.name,
                "source": spec.source,
                "default": spec.name == self.registry.default.name,
                "queue": spec.queue,
                "queue_depth": depth,
                "workers": sum(1 for w in live if w.model == spec.name),
                "max_input_tokens": spec.max_input_tokens,
                "max_total_tokens": spec.max_total_tokens,
            }
            for spec, depth in zip(specs.values(), depths, strict=True)
        ]

    def live_workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is current."""
        return self.directory.live()

    def _model_for(self, name: str | None) -> ModelSpec:
        if name is None:
            return self.registry.default
        spec = self.registry.get(name)
        if spec is None:
            known = ", ".join(self.registry.names())
            raise ApiError(
                422,
                "validation_error",
                f"unknown model {name!r}",
                [{"name": "model", "message": f"unknown model {name!r}; known models: {known}"}],
            )
        return spec


def _check_limits(spec: ModelSpec, max_new_tokens: int | None, max_length: int | None) -> None:
    if max_new_tokens is not None and max_new_tokens > spec.max_new_tokens:
        raise ApiError(
            422,
            "validation_error",
            "parameters.max_new_tokens is over the model's limit",
            [
                {
                    "name": "parameters.max_new_tokens",
                    "message": f"must be <= {spec.max_new_tokens} for {spec.name}",
                }
            ],
        )
    if max_new_tokens is None and max_length is not None and max_length > spec.max_total_tokens:
        raise ApiError(
            422,
            "validation_error",
            "parameters.max_length is over the model's limit",
            [{"name": "parameters.max_length", "message": f"must be <= {spec.max_total_tokens} for {spec.name}"}],
        )

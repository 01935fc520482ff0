"""What the web does with jobs: validate against the registry, store, queue, read back."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from config.lengths import LengthError, check_lengths
from config.logs import job_context
from config.models import ModelRegistry, ModelSpec
from config.settings import Settings
from jobs.celery_app import withdraw_message
from jobs.queues import BatchQueue, enqueue
from jobs.quotas import Quotas, token_budget
from jobs.schema import Job, JobRequest, new_job_id, utcnow
from jobs.store import JobStore
from jobs.webhooks import WebhookURLError, check_url
from jobs.workers import WorkerDirectory, WorkerInfo
from web.http.errors import ApiError
from web.services.idempotency import IdempotencyClaim
from web.services.tokens import PromptCounter

log = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER = 5  # seconds a client is told to wait when a model's queue is full
UNAVAILABLE_RETRY_AFTER = 1  # ... and when Redis is unavailable (restarting, failing over)


@dataclass
class JobService:
    """The web side of the data path: form/REST -> store + Celery send; store -> poll."""

    settings: Settings
    registry: ModelRegistry
    store: JobStore
    directory: WorkerDirectory
    celery: Celery
    prompt_counter: PromptCounter = field(default_factory=PromptCounter)
    # Counts jobs against the caller's rate limit (a 429 ApiError when they do not fit); the app sets it.
    charge: Callable[[int], None] = field(default=lambda jobs: None)
    # Stamps jobs with the caller's quota hold (a 429 ApiError when they do not fit); the app sets it.
    hold: Callable[[list[Job]], list[Job]] = field(default=lambda jobs: jobs)
    _live_models: set[str] = field(default_factory=set)
    _live_models_at: float = -1e9
    batch_queue: BatchQueue = field(init=False)
    quotas: Quotas = field(init=False)

    def __post_init__(self) -> None:
        self.batch_queue = BatchQueue(self.store.redis)
        self.quotas = Quotas(self.store.redis)

    def prepare(self, request: JobRequest, owner: str | None = None, batch: BatchOrigin | None = None) -> Job:
        """The job ``request`` makes, checked with every rule a job must meet (model known, lengths within
        its limits, webhook allowed, timeout within the maximum); nothing is written. ``batch``: the job is a
        line of a batch (batch priority class, the batch's deadline)."""
        spec = self._model_for(request.model)
        params = request.parameters.normalised(self.settings.default_max_new_tokens)
        try:
            counted = self.prompt_counter.count(spec, request.inputs)
            if counted is not None and params.truncate is not None:
                counted = min(counted, params.truncate)
            max_new = check_lengths(spec, params.max_new_tokens, params.max_length, counted, params.min_new_tokens)
        except LengthError as exc:
            raise _field_error(exc.field, exc.message) from None
        self._check_webhook(request)
        timeout = min(request.timeout or self.settings.max_job_seconds, self.settings.max_job_seconds)
        if request.timeout is not None and request.timeout > self.settings.max_job_seconds:
            raise ApiError(422, "validation_error", "timeout is over the server's maximum", [
                {"name": "timeout", "message": f"must be <= {self.settings.max_job_seconds:g} seconds"}])
        job = Job(
            id=new_job_id(),
            model=spec.name,
            inputs=request.inputs,
            parameters=params,
            webhook=request.webhook,
            webhook_events=list(request.webhook_events) if request.webhook else [],
            owner=owner,
            priority=request.priority,
            token_budget=token_budget(spec, request.inputs, counted, max_new, params.max_length),
        )
        job = job.model_copy(update={"deadline": job.created_at + timedelta(seconds=timeout)})
        if batch is not None:
            job = job.model_copy(update={"priority_class": "batch", "batch_id": batch.batch_id,
                                         "deadline": batch.deadline})
        return job

    def submit(
        self,
        request: JobRequest,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> tuple[Job, bool]:
        """Validate ``request``, store it queued and send it to its model's queue.

        Returns the job and whether it is new: with an ``idempotency_key`` already used for the same
        request, the earlier job comes back instead (``False``); for another request, a 409.
        """
        jobs, created = self.submit_all([request], idempotency_key, owner)
        return jobs[0], created

    def submit_all(
        self, requests: list[JobRequest], idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[list[Job], bool]:
        """Validate every request, then store and queue all of their jobs or none (the jobs of one ``n``,
        ``best_of`` or multi-prompt request): a refusal (a bad request, the queue cap, the rate limit,
        replicas that do not acknowledge) leaves no record and no message behind.

        With an ``idempotency_key`` (job ``i`` of several binds ``<key>#<i>``) used before for the same
        requests, the earlier jobs come back instead (``False``).
        """
        jobs = [self.prepare(request, owner) for request in requests]
        for spec in {job.model: self._model_for(job.model) for job in jobs}.values():
            self._check_queue(spec, sum(1 for job in jobs if job.model == spec.name))
        claims = None
        if idempotency_key is not None:  # each owner has its own keys
            keys = [idempotency_key] if len(jobs) == 1 else [f"{idempotency_key}#{i}" for i in range(len(jobs))]
            claims = [IdempotencyClaim(f"{owner or ''}|{key}", request, job.id)
                      for key, request, job in zip(keys, requests, jobs, strict=True)]
        self.charge(len(jobs))
        jobs = self.hold(jobs)
        sent: list[Job] = []
        try:
            # The keys are bound in the same transaction that stores the jobs: a crash in between cannot
            # leave a key pointing at a job that was never made.
            try:
                earlier = self.store.create_all(jobs, [claim.binding for claim in claims] if claims else None)
            except ValueError:
                raise ApiError(409, "idempotency_conflict", "some of this Idempotency-Key's jobs no longer exist "
                               "(past retention); use a new key") from None
            if earlier is None:
                for job in jobs:
                    enqueue(self.celery, self.batch_queue, job)
                    sent.append(job)
                self._confirm_durable([job.id for job in jobs])
        except Exception as exc:
            # Nothing half-written: jobs that could not all be queued are not left behind as "queued" (nor
            # their messages), and their idempotency keys are free for the client's retry.
            if not isinstance(exc, ApiError) or exc.status >= 500:
                self._withdraw(jobs, sent, claims)  # deleting the records gives their quota back
            else:
                self.release_holds(jobs)  # refused before anything was written
            if isinstance(exc, OperationalError):  # Celery's wrapping of a broker connection error
                raise ApiError(503, "unavailable", "the queue (Redis) is unavailable; try again shortly",
                               retry_after=UNAVAILABLE_RETRY_AFTER) from exc
            raise
        if earlier is not None:  # outside the clean-up above: the keys stay bound to the jobs they made
            assert claims is not None
            self.release_holds(jobs)  # the earlier jobs hold their own
            found = [self._earlier_job(claim, record) for claim, record in zip(claims, earlier, strict=True)]
            self._confirm_durable([job.id for job in found])
            return found, False
        for job in jobs:
            with job_context(job.id):
                log.info("job %s: queued for %s", job.id, job.model)
        return jobs, True

    def _withdraw(self, jobs: list[Job], sent: list[Job], claims: list[IdempotencyClaim] | None) -> None:
        """Undo a refused submission: its messages, records and idempotency keys."""
        with contextlib.suppress(redis.RedisError, OperationalError):
            for job in sent:
                if job.priority_class == "batch":
                    self.batch_queue.withdraw(job.model, job.owner, job.id)
                else:
                    withdraw_message(self.store.redis, job.queue, job.id)
            for job in jobs:
                self.store.delete(job)
            for claim in claims or []:
                self.store.redis.delete(claim.redis_key)

    def release_holds(self, jobs: list[Job]) -> None:
        """Give back the quota held by jobs that were never made (best effort: Redis may be down)."""
        with contextlib.suppress(redis.RedisError):
            self.quotas.release(jobs)

    def _confirm_durable(self, job_ids: list[str]) -> None:
        """With ``BLOOMQ_REDIS_MIN_REPLICAS``, a 503 unless the jobs and their messages reached that many
        replicas in time: a job is accepted only once a failover cannot take it away."""
        replicas = self.settings.redis_min_replicas
        if replicas and not self.store.replicated(job_ids, replicas, self.settings.redis_replica_wait_seconds):
            raise ApiError(503, "unavailable", f"the job could not be copied to {replicas} Redis replica(s) in time "
                           "(a failover, or a replica down); try again shortly", retry_after=UNAVAILABLE_RETRY_AFTER)

    def cancel(self, job_id: str, owner: str | None = None) -> tuple[Job, str]:
        """Cancel a job (see JobStore.cancel); a 404 ApiError when unknown or another key's."""
        self.get(job_id, owner)
        job, outcome = self.store.cancel(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired after retention)")
        return job, outcome

    def _earlier_job(self, claim: IdempotencyClaim, record: str) -> Job:
        """The job an already-used idempotency key made, or a 409 when it was made for another body."""
        earlier = json.loads(record)
        if earlier["fingerprint"] != claim.fingerprint:
            raise ApiError(409, "idempotency_conflict",
                           "this Idempotency-Key was already used with a different request body")
        found = self.store.get(earlier["job_id"])
        if found is None:
            raise ApiError(409, "idempotency_conflict",
                           "this Idempotency-Key's job no longer exists (past retention); use a new key")
        return found

    def _check_queue(self, spec: ModelSpec, jobs: int = 1) -> None:
        """Admission control: refuse (429, before anything is written) when the model's queue has no room
        for ``jobs`` more."""
        depth = self.store.redis.llen(spec.queue)
        if depth + jobs > self.settings.max_queue:
            room = max(0, self.settings.max_queue - depth)
            raise ApiError(429, "queue_full",
                           f"{spec.name} has {depth} jobs waiting (the limit is {self.settings.max_queue}): no room "
                           f"for {jobs} more (room for {room}); retry later", retry_after=QUEUE_FULL_RETRY_AFTER)

    def _check_webhook(self, request: JobRequest) -> None:
        if request.webhook is None:
            return
        if not self.settings.webhook_secret:
            raise ApiError(422, "validation_error", "webhooks are not enabled on this server", [
                {"name": "webhook", "message": "webhooks are disabled: the server has no BLOOMQ_WEBHOOK_SECRET"}])
        try:
            check_url(request.webhook, self.settings.webhook_allow)
        except WebhookURLError as exc:
            raise ApiError(422, "validation_error", str(exc), [{"name": "webhook", "message": str(exc)}]) from None

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, or a 404 ApiError (also for another key's job). A queued job past its deadline is
        expired on the spot."""
        job = _owned(self.store.get(job_id), owner)
        if job is not None and job.overdue(utcnow()):
            expired = self.store.expire_if_queued(job_id)
            job = expired or self.store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired after retention)")
        return job

    def wait(self, job_id: str, seconds: float, owner: str | None = None) -> Job:
        """The job once final, or after ``seconds``; a 404 ApiError when unknown or another key's."""
        self.get(job_id, owner)
        job = self.store.wait(job_id, seconds)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired after retention)")
        return job

    def models(self) -> list[dict[str, Any]]:
        """Configured models and every model a live worker serves, with queue depth and live workers."""
        live = self.directory.live()
        specs: dict[str, ModelSpec] = {spec.name: spec for spec in self.registry.configured}
        for worker in live:
            specs.setdefault(worker.model, self.registry.get(worker.model) or _announced_spec(worker))
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

    def has_live_worker(self, model: str) -> bool:
        """Whether some live worker serves ``model`` (looked up at most once a second)."""
        now = time.monotonic()
        if now - self._live_models_at > 1.0:
            self._live_models = {w.model for w in self.directory.live()}
            self._live_models_at = now
        return model in self._live_models

    def spec_for(self, name: str) -> ModelSpec | None:
        """The model a job may name ``name`` (short name or reference): a configured or preset model, or
        one a live worker announces (a machine that joins with a new model needs no web restart)."""
        spec = self.registry.get(name)
        if spec is not None:
            return spec
        for worker in self.directory.live():
            if name in (worker.model, worker.source):
                return _announced_spec(worker)
        return None

    def served_spec_for(self, name: str) -> ModelSpec | None:
        """The model a compatible (synchronous) request may name: one configured here or served by a live
        worker. A request for a preset that is neither would only hold its client until the wait runs out."""
        spec = self.spec_for(name)
        if spec is None:
            return None
        if spec.name in {c.name for c in self.registry.configured} or self.has_live_worker(spec.name):
            return spec
        return None

    def _model_for(self, name: str | None) -> ModelSpec:
        if name is None:
            return self.registry.default
        spec = self.spec_for(name)
        if spec is None:
            known = ", ".join(self.registry.names())
            raise ApiError(
                422,
                "validation_error",
                f"unknown model {name!r}",
                [{"name": "model", "message": f"unknown model {name!r}; known models: {known}"}],
            )
        return spec


def _announced_spec(worker: WorkerInfo) -> ModelSpec:
    """A model known only from a live worker's announcement (its limits as the worker gives them)."""
    limits = {}
    if worker.max_input_tokens and worker.max_total_tokens:
        limits = {"max_input_tokens": worker.max_input_tokens, "max_total_tokens": worker.max_total_tokens}
    return ModelSpec(name=worker.model, source=worker.source or worker.model, **limits)


def _field_error(name: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{name}: {message}", [{"name": name, "message": message}])


def _owned(job: Job | None, owner: str | None) -> Job | None:
    """``job`` if ``owner`` may see it: with API keys on, only the key that made it."""
    if job is None or owner is None or job.owner == owner:
        return job
    return None


@dataclass(frozen=True)
class BatchOrigin:
    """What makes a job a line of a batch."""

    batch_id: str
    deadline: datetime

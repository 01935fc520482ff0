"""The job runner: moves one job through the store around the engine (start, progress, cancel, result)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import redis

from jobs.schema import FinishReason, GenerateParameters, Job, JobError, JobOutput, JobStatus, utcnow
from jobs.store import JobStore
from worker.engine.core import Engine
from worker.engine.faults import DeviceFault, GenerationError
from worker.engine.outputs import Completion
from worker.engine.params import SamplingParams
from worker.engine.sequence import Sequence
from worker.progress import ProgressPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a worker keeps checking that a replica has a final result (storing it again if a failover lost
# it) before it acknowledges the job's message anyway: longer than a Sentinel failover and an old master's
# return as a replica; short enough that a replica down for good does not hold a finished job's thread long.
REPLICA_PATIENCE = 60.0


def engine_params(params: GenerateParameters) -> SamplingParams:
    """A job's parameters as the engine takes them (the same names; the decoding mode made explicit)."""
    fields = params.model_dump()
    fields.update(do_sample=params.sampling, stop=tuple(params.stop))
    return SamplingParams(**fields)


def job_output(completion: Completion) -> JobOutput:
    """The engine's completion as the job's output (the same fields)."""
    return JobOutput.model_validate(completion, from_attributes=True)


@dataclass
class _Attempt:
    """A job this process is running: its attempt number and, once submitted, its sequence in the engine.

    Registered before the store is asked to start the job, so a second delivery of the same job to this
    process is turned away here, whatever the store says."""

    number: int = 0  # 0 until the store has started the job
    seq: Sequence | None = None
    superseded: bool = False  # the job was taken from this attempt: stop, and store nothing


class JobRunner:
    """Runs jobs on the engine and stores exactly their one final result."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        worker_name: str,
        instance: str | None = None,
        requeue: Callable[[Job], None] | None = None,
        result_patience: float = 600.0,
        replicas: tuple[int, float] | None = None,
        replica_patience: float = REPLICA_PATIENCE,
    ) -> None:
        """``replicas``: (how many, seconds): a final result is waited on until that many Redis replicas
        have it (BLOOMQ_REDIS_MIN_REPLICAS), before the job's message is acknowledged, so a failover right
        after cannot lose the result of a job whose message is gone (which would run it twice). A result
        a failover lost meanwhile is stored again; after ``replica_patience`` seconds the worker moves on."""
        self.replicas = replicas
        self.replica_patience = replica_patience
        self.store = store
        self.instance = instance or worker_name
        self.engine = engine
        self.worker_name = worker_name
        self.requeue = requeue
        self.result_patience = result_patience
        self._running: dict[str, _Attempt] = {}
        self._lock = threading.Lock()
        self.publisher = ProgressPublisher(store, engine, on_cancel=self.cancel, on_superseded=self.abandon)

    def run(self, job_id: str) -> None:
        """Run a queued (or redelivered) job; skip one that already has its final result or is running
        on a live worker (the store decides that atomically)."""
        with self._lock:
            if job_id in self._running:
                log.info("job %s: already running here; message acknowledged", job_id)
                return
            running = self._running[job_id] = _Attempt()
        try:
            self._start_and_run(job_id, running)
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def _start_and_run(self, job_id: str, running: _Attempt) -> None:
        job = self.store.start(job_id, self.worker_name, self.instance)
        if job is None or job.status is not JobStatus.RUNNING:
            reason = (
                "unknown, expired, already finished, or running on a live worker"
                if job is None
                else f"{job.status.value} before it ran"
            )
            log.info("job %s: %s; message acknowledged", job_id, reason)
            return
        attempt = running.number = job.attempts  # our fencing token: the store refuses a stale attempt's results
        log.info("job %s: started (attempt %d%s)", job_id, attempt, ", alone: suspected poison" if job.device_faults else "")
        try:
            self._run_attempt(job, running)
        except Exception as exc:
            # Whatever went wrong, the job must not stay "running" on a live worker.
            log.exception("job %s: attempt %d broke", job_id, attempt)
            error = JobError(type="internal_error", message=f"{type(exc).__name__}: {exc}")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))

    def _run_attempt(self, job: Job, running: _Attempt) -> None:
        job_id, attempt = job.id, running.number
        if job.cancel_requested:
            empty = JobOutput(generated_text="", generated_tokens=0, finish_reason=FinishReason.CANCELED)
            self._finish(job_id, attempt, FinishReason.CANCELED, empty, 0.0)
            return
        try:
            # A job that was in a batch when a worker's device failed runs alone: if it is the cause, the
            # next failure names it (a poison job) without taking other jobs down with it.
            seq = self.engine.submit(
                job.inputs,
                engine_params(job.parameters),
                timeout=_seconds_left(job.deadline),
                isolated=job.device_faults > 0,
                rank=(0 if job.priority_class == "interactive" else 1, job.priority),
            )
        except DeviceFault as exc:
            # Delivered after this process's device failed, as it exits: not this job's fault. Back to the
            # queue, unblamed, for a live worker to send at once.
            log.warning("job %s: arrived as this worker stops after a device failure; handed back", job_id)
            try:
                self.store.record_device_fault(job_id, attempt, str(exc), blamed=False)
            except redis.RedisError:
                log.warning("job %s: could not hand it back; the reaper will", job_id)
            return
        except GenerationError as exc:
            log.info("job %s: %s: %s", job_id, exc.type, exc)
            error = JobError(type=exc.type, message=str(exc))
            self._store_final(job_id, lambda: self.store.fail(job_id, error, attempt=attempt))
            return
        with self._lock:
            running.seq = seq
            stop_now = running.superseded
        if stop_now:
            self.engine.cancel(seq)
        self.publisher.follow(job_id, seq, attempt)
        try:
            seq.done.wait()
        finally:
            self.publisher.forget(job_id)  # flushes the last text before the final result is stored
        if running.superseded:
            log.warning("job %s: attempt %d was stopped: the job was taken from it", job_id, attempt)
            return
        if self.engine.fatal_error is not None:
            return  # the process is exiting; its jobs were handed back (see record_device_fault)
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
        first = round(result.first_token_seconds, 6) if result.first_token_seconds is not None else None
        output = job_output(result.output)
        self._finish(job_id, attempt, output.finish_reason, output, round(result.seconds, 6), first)

    def cancel(self, job_id: str) -> bool:
        """Stop a job this process is running; False when it is not running here."""
        with self._lock:
            running = self._running.get(job_id)
            seq = running.seq if running is not None else None
        if seq is None:
            return False
        self.engine.cancel(seq)
        return True

    def abandon(self, job_id: str) -> bool:
        """Stop a job whose attempt here no longer owns it (requeued, taken over): its result is not stored."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return False
            running.superseded = True
            seq = running.seq
        if seq is not None:  # else it is stopped as soon as it is submitted
            self.engine.cancel(seq)
        return True

    def hand_back_after_device_fault(self, exc: BaseException) -> None:
        """The device failed for good (the process is about to exit): give every started job back to the
        queue, marked for a live worker's reaper to send at once. The fault counts against the jobs in the
        engine's batch at the time (a job at its second fault fails as a poison job), not against those
        still waiting in the process for a row."""
        with self._lock:
            running = dict(self._running)
        in_batch = {id(seq) for seq in self.engine.running}
        for job_id, attempt in running.items():
            if attempt.number == 0:
                continue  # not started: the store still has it queued (or running elsewhere)
            blamed = attempt.seq is not None and id(attempt.seq) in in_batch
            try:
                job = self.store.record_device_fault(job_id, attempt.number, f"{type(exc).__name__}: {exc}", blamed)
            except redis.RedisError:
                log.warning("job %s: could not hand it back; the reaper will", job_id)
                continue
            if job is None:
                continue
            if job.status is JobStatus.QUEUED:
                # No message from here: this process's own consumer could take it as the process dies.
                log.warning("job %s: handed back after the device failed (%s, fault %d); a live worker sends it",
                            job_id, "in the failing batch" if blamed else "waiting", job.device_faults)
            elif job.status is JobStatus.FAILED:
                log.error("job %s: failed as a poison job", job_id)

    def _finish(
        self, job_id: str, attempt: int, reason: FinishReason | None, output: JobOutput, seconds: float,
        first_token_seconds: float | None = None,
    ) -> None:
        if reason is FinishReason.CANCELED:
            self._store_final(job_id, lambda: self.store.finish_canceled(job_id, output, seconds, attempt=attempt))
        elif reason is FinishReason.TIMEOUT:
            error = JobError(type="timeout", message="the job reached its deadline while running")
            self._store_final(job_id, lambda: self.store.fail(job_id, error, seconds, output=output, attempt=attempt))
        else:
            self._store_final(job_id, lambda: self.store.succeed(job_id, output, seconds, attempt=attempt,
                                                                 first_token_seconds=first_token_seconds))

    def _store_final(self, job_id: str, write: Callable[[], Job | None]) -> None:
        job = store_patiently(write, f"job {job_id}: storing the result", self.result_patience)
        if job is None:
            log.warning("job %s: not stored: it was finished or taken over elsewhere first", job_id)
            return
        if self.replicas is not None:
            job = self._until_replicated(job_id, job, write)
            if job is None:
                return
        output = job.output
        log.info(
            "job %s: %s, %d tokens (%s)",
            job_id,
            job.status.value,
            output.generated_tokens if output else 0,
            output.finish_reason.value if output and output.finish_reason else (job.error.type if job.error else "-"),
        )


    def _until_replicated(self, job_id: str, job: Job, write: Callable[[], Job | None]) -> Job | None:
        """Wait until a replica has the job's final result. A result not yet replicated can be lost in a
        failover: the replica promoted before it arrived, or it went to an old master that came back and
        was turned into a replica. Each time a replica answers, the job is read back: still final as
        written, it is done; back to running under this attempt (the write was lost), it is written again;
        taken over by another attempt meanwhile, this one stores nothing (None)."""
        count, seconds = self.replicas
        deadline = time.monotonic() + self.replica_patience
        delay = 0.2
        while True:
            try:
                if self.store.replicated([job_id], count, seconds):
                    current = self.store.get(job_id)
                    if current is not None and current.status is job.status and current.attempts == job.attempts:
                        return job
                    again = write()
                    if again is None:
                        log.warning("job %s: not stored: it was finished or taken over elsewhere first", job_id)
                        return None
                    log.warning("job %s: its result was lost in a Redis failover; stored again", job_id)
                    job = again
                    continue
                log.warning("job %s: its result reached fewer than %d replica(s) within %.1fs", job_id, count,
                            seconds)
            except redis.RedisError as exc:
                log.warning("job %s: could not wait for replicas: %s", job_id, exc)
            if time.monotonic() >= deadline:
                log.warning("job %s: no replica confirmed its result in %.0fs; left as stored", job_id,
                            self.replica_patience)
                return job
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def store_patiently(write: Callable[[], T], what: str, patience: float) -> T:
    """Run ``write``, retrying for up to ``patience`` seconds while Redis is unreachable (a restart, a
    network blip): a finished job's result is not thrown away because Redis was down for a moment."""
    delay, waited = 0.2, 0.0
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if waited >= patience:
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


def _seconds_left(deadline: datetime | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, (deadline - utcnow()).total_seconds())

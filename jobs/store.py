"""The Redis job store: the one source of truth for a job's status and result.

Celery only carries job ids; every job record lives here under ``bloomq:job:<id>`` (a hash with the
``status`` and the JSON ``doc``), expiring ``retention`` seconds after its last write. Transitions are
optimistic transactions (WATCH/MULTI) so that a job gets exactly one final result even when a message is
delivered twice.

Each job also has an event log, a capped Redis Stream ``bloomq:job-stream:<id>`` (``status``, ``token``
and a final ``done`` event), written in the same transaction as the record, which is what streaming
clients read and resume from (``Last-Event-ID`` = the stream entry id). Status and token events carry
the attempt number: when a job restarts on another worker, a ``status`` event with a higher attempt
tells readers to start the text over, and tokens of a replaced attempt are to be ignored.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from config.settings import DEFAULT_SENTINEL_MASTER, parse_sentinel_url
from jobs import metrics, outbox
from jobs.schema import Job, JobError, JobMetrics, JobOutput, JobStatus, utcnow
from jobs.workers import WORKER_KEY_PREFIX

log = logging.getLogger(__name__)

JOB_KEY_PREFIX = "bloomq:job:"
JOB_EVENTS_PREFIX = "bloomq:job-events:"
JOB_STREAM_PREFIX = "bloomq:job-stream:"
DEADLINES_KEY = "bloomq:deadlines"
RUNNING_KEY = "bloomq:running"  # ids of jobs in state running, for the reaper
# Per model, interactive jobs only: job id -> when it was (re)queued or last re-sent, for the reaper's
# lost-delivery scan. Batch lines wait in their own lists and come back through the taken lists, and a
# model without a live worker is not scanned: neither can hide a lost interactive job behind a backlog.
QUEUED_PREFIX = "bloomq:queued:"
CANCEL_CHANNEL = "bloomq:cancels"
EXPIRED = JobError(type="expired", message="the job was still queued at its deadline")
POISON_AFTER = 2  # fatal device errors a job may be part of before it is failed as a poison job
# Marks a job record as sent, if it exists (a write WAIT can follow; HSET propagates even when unchanged).
_MARK_SENT = ("if redis.call('HEXISTS', KEYS[1], 'doc') == 1 then redis.call('HSET', KEYS[1], 'sent', '1') return 1 end "
              "return 0")
# A compare-and-set on the job's clock in the queued index: only the caller that finds it still stale
# moves it on, so of several reapers that see the same lost job, one re-sends it.
_CLAIM_RESEND = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
  return 1
end
return 0
"""
SEND_NOW = -1.0  # a queued job's score in its model's index when it has no message at all: send one at once
STREAM_MAXLEN = 10_000  # events kept per job: every token of the longest BLOOM job, with room to spare


BATCH_KEY_PREFIX = "bloomq:batch:"


def batch_key(batch_id: str) -> str:
    """The Redis key of a batch record (its line counters live there too)."""
    return f"{BATCH_KEY_PREFIX}{batch_id}"


def queued_key(model: str) -> str:
    """The index of ``model``'s queued interactive jobs (score: when queued or last re-sent)."""
    return f"{QUEUED_PREFIX}{model}"


def job_key(job_id: str) -> str:
    """The Redis key of a job record."""
    return f"{JOB_KEY_PREFIX}{job_id}"


def job_events_channel(job_id: str) -> str:
    """The pub/sub channel that announces a job's status changes."""
    return f"{JOB_EVENTS_PREFIX}{job_id}"


def job_stream_key(job_id: str) -> str:
    """The Redis Stream holding a job's events."""
    return f"{JOB_STREAM_PREFIX}{job_id}"


OWNER_JOBS_PREFIX = "bloomq:owner-jobs:"
OWNED_SCAN_LIMIT = 1000  # index entries one listing request examines at most (a status filter may skip many)


def owner_jobs_key(owner: str | None) -> str:
    """The index of the jobs one API key made (``-``: those made without a key), scored by creation time."""
    return f"{OWNER_JOBS_PREFIX}{owner or '-'}"


@dataclass(frozen=True)
class OwnedPosition:
    """A place in an owner's listing (newest first): the entry with this creation time and job id."""

    created: float
    job_id: str


def connect(url: str, sentinel_master: str = DEFAULT_SENTINEL_MASTER) -> redis.Redis:
    """A Redis client with short timeouts, so a dead Redis is reported instead of hanging a request.

    For a ``sentinel://`` URL the client asks the sentinels where the master named ``sentinel_master``
    is, at every (re)connection: after a failover it finds the new master without a restart, and a
    connection to a former master that was turned into a replica is dropped at its first refused write.
    """
    options: dict[str, Any] = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 15,
                               "retry_on_timeout": True}
    target = parse_sentinel_url(url, sentinel_master)
    if target is None:
        return redis.Redis.from_url(url, **options)
    # Sentinels answer at once or are skipped: a dead one must not hold up finding the master.
    sentinel = MajoritySentinel(list(target.sentinels),
                                sentinel_kwargs={"socket_connect_timeout": 0.5, "socket_timeout": 1},
                                db=target.db, username=target.username, password=target.password, **options)
    return sentinel.master_for(target.master)


class MajoritySentinel(Sentinel):
    """redis-py's Sentinel client, trusting a master address only when most of the sentinels name it.

    redis-py takes the first answer. A sentinel that has not yet heard of a failover (they learn of it
    within a couple of seconds) still names the old master; if that machine is back by then, it is still
    a master until the sentinels turn it into a replica, and everything written to it is thrown away when
    it resynchronises: a job store must not be split like that.
    """

    def discover_master(self, service_name: str) -> tuple[str, int]:
        votes: collections.Counter[tuple[str, int]] = collections.Counter()
        for sentinel in self.sentinels:
            try:
                state = sentinel.sentinel_masters().get(service_name)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if state and self.check_master_state(state, service_name):
                votes[(state["ip"], state["port"])] += 1
        if votes:
            address, count = votes.most_common(1)[0]
            if count > len(self.sentinels) // 2:
                return address
        raise MasterNotFoundError(f"no master named {service_name!r} by a majority of the sentinels ({dict(votes)})")


@dataclass(frozen=True)
class ProgressUpdate:
    """What a worker reports about one running job: new text, token count, maybe a partial output."""

    job_id: str
    delta: str
    tokens: int
    output: JobOutput | None = None
    attempt: int = 0  # which attempt produced it: readers ignore reports of an attempt no longer current
    restarted: bool = False  # the engine started the text over (within the same attempt) since the last report
    token_details: list[dict[str, Any]] | None = None  # the new tokens, one each, for jobs that asked for details


@dataclass(frozen=True)
class ProgressReply:
    """What the store tells a worker back about the jobs it reported on."""

    cancel: set[str]  # a cancel was requested: stop them
    superseded: set[str]  # no longer this attempt's to run (requeued, taken over, finished elsewhere): stop them


class CancelOutcome:
    """What a cancel request did."""

    CANCELED = "canceled"  # it was queued: it will never run
    REQUESTED = "cancel_requested"  # it is running: the worker stops it within one step
    ALREADY_FINAL = "already_final"  # nothing to do


# A waiter re-reads the job at least this often, in case a change's notice was lost (a reconnect).
WAIT_RECHECK_SECONDS = 1.0


class JobStore:
    """Create, read and advance job records."""

    def __init__(self, client: redis.Redis, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self._claim_resend = client.register_script(_CLAIM_RESEND)

    # -- reading -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it is unknown or expired; a running job shows its latest progress."""
        return _job_from_fields(self.redis.hgetall(job_key(job_id)))

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Several jobs (as ``get`` reads them) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [_job_from_fields(fields) for fields in pipe.execute()]

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is terminal, or as it is after ``timeout`` seconds; None when unknown."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribe before reading, so a change between the read and the wait is not missed.
            pubsub.subscribe(job_events_channel(job_id))
            job = self.get(job_id)
            deadline = time.monotonic() + timeout
            while job is not None and not job.status.terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                pubsub.get_message(timeout=min(left, WAIT_RECHECK_SECONDS))
                job = self.get(job_id)
            return job
        finally:
            pubsub.close()

    def read_events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, str]]:
        """Events after stream id ``after`` as (id, event, data), waiting up to ``block_ms`` for one."""
        reply = self.redis.xread({job_stream_key(job_id): after}, count=200, block=block_ms)
        events = []
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                events.append((_text(entry_id), _text(fields[b"event"]), _text(fields[b"data"])))
        return events

    def list_owned(
        self,
        owner: str | None,
        limit: int,
        after: OwnedPosition | str | None = None,
        status: JobStatus | None = None,
    ) -> tuple[list[Job], OwnedPosition | None]:
        """``owner``'s jobs, newest first: up to ``limit`` of them after ``after`` (a position, or a job id
        in the listing; LookupError when it is not), and where the next page starts (None at the end).

        Index entries whose record has expired are dropped on the way. At most ``OWNED_SCAN_LIMIT`` entries
        are examined per call, so with a ``status`` filter a page may come back short with a position.
        """
        key = owner_jobs_key(owner)
        if isinstance(after, str):
            score = self.redis.zscore(key, after)
            if score is None:
                raise LookupError(after)
            after = OwnedPosition(score, after)
        chunk = max(limit + 1, 50)
        matched: list[OwnedPosition] = []  # one more than a page, to know whether another page follows
        position, examined, exhausted = after, 0, False
        while len(matched) <= limit and examined < OWNED_SCAN_LIMIT and not exhausted:
            count = min(chunk, OWNED_SCAN_LIMIT - examined)
            entries = self._owned_after(key, position, count)
            pipe = self.redis.pipeline(transaction=False)
            for entry in entries:
                pipe.hget(job_key(entry.job_id), "status")
            statuses = pipe.execute() if entries else []
            exhausted = len(entries) < count
            gone = []
            for entry, raw in zip(entries, statuses, strict=True):
                examined += 1
                position = entry
                if raw is None:  # the record expired; its index entry goes too
                    gone.append(entry.job_id)
                elif status is None or _text(raw) == status.value:
                    matched.append(entry)
                    if len(matched) > limit:
                        exhausted = False
                        break
            if gone:
                self.redis.zrem(key, *gone)
        page = matched[:limit]
        jobs = [job for job in self.get_many([entry.job_id for entry in page]) if job is not None]
        if len(matched) > limit:
            return jobs, page[-1]
        return jobs, None if exhausted else position

    def _owned_after(self, key: str, position: OwnedPosition | None, count: int) -> list[OwnedPosition]:
        """Up to ``count`` index entries after ``position``, newest first (ties in reverse id order, as
        ZREVRANGEBYSCORE gives them)."""
        if position is None:
            rows = self.redis.zrevrangebyscore(key, "+inf", "-inf", start=0, num=count, withscores=True)
            return [OwnedPosition(score, _text(member)) for member, score in rows]
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(key, position.created, position.created)  # entries made in the same instant
        pipe.zrevrangebyscore(key, f"({position.created!r}", "-inf", start=0, num=count, withscores=True)
        ties, older = pipe.execute()
        same = sorted((m for m in map(_text, ties) if m < position.job_id), reverse=True)
        entries = [OwnedPosition(position.created, m) for m in same]
        entries += [OwnedPosition(score, _text(member)) for member, score in older]
        return entries[:count]

    # -- writing -----------------------------------------------------------------------------------

    def create(self, job: Job, idempotency: tuple[str, str] | None = None) -> str | None:
        """Store a new job (status queued).

        ``idempotency``: (Redis key, record) bound to the job in the same transaction, unless the key is
        already bound: then nothing is written and the key's existing record comes back.
        """
        earlier = self.create_all([job], [idempotency] if idempotency is not None else None)
        return earlier[0] if earlier is not None else None

    def create_all(self, jobs: list[Job], idempotency: list[tuple[str, str]] | None = None) -> list[str] | None:
        """Store new jobs (status queued), all in one transaction: every one of them or none.

        ``idempotency``: one (Redis key, record) per job, bound in the same transaction. When the keys are
        already bound, nothing is written and their records come back (one per job; a key bound on its
        own, its siblings gone, comes back as a ValueError).
        """
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idempotency is not None:
                        keys = [key for key, _ in idempotency]
                        pipe.watch(*keys)
                        earlier = [pipe.get(key) for key in keys]
                        if any(record is not None for record in earlier):
                            pipe.unwatch()
                            if any(record is None for record in earlier):
                                raise ValueError("some of these idempotency keys are bound, others are not")
                            return [_text(record) for record in earlier if record is not None]
                    pipe.multi()
                    for index, job in enumerate(jobs):
                        self.stage_new(pipe, job)
                        if idempotency is not None:
                            pipe.set(idempotency[index][0], idempotency[index][1], ex=self.retention_seconds)
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def stage_new(self, pipe: Any, job: Job) -> None:
        """The writes that make ``job`` exist, queued, added to a transaction (``pipe`` after MULTI)."""
        key = job_key(job.id)
        pipe.hset(key, mapping={"status": job.status.value, "attempt": job.attempts, "doc": job.to_json()})
        pipe.expire(key, self.retention_seconds)
        created = {"status": job.status.value, "cancel_requested": False, "attempt": 0}
        self._event(pipe, job.id, "status", created)
        if job.deadline is not None:
            pipe.zadd(DEADLINES_KEY, {job.id: job.deadline.timestamp()})
        metrics.record_submitted(pipe, job)
        if job.priority_class == "interactive":
            pipe.zadd(queued_key(job.model), {job.id: time.time()})
        self._index_owned(pipe, job)

    def _index_owned(self, pipe: Any, job: Job) -> None:
        """List ``job`` under its owner, and trim that index to the retention window (it never outgrows it)."""
        key = owner_jobs_key(job.owner)
        pipe.zadd(key, {job.id: job.created_at.timestamp()})
        pipe.zremrangebyscore(key, "-inf", f"({time.time() - self.retention_seconds!r}")
        pipe.expire(key, self.retention_seconds)

    def replicated(self, job_ids: list[str], replicas: int, timeout_seconds: float) -> bool:
        """Whether the records of ``job_ids``, and every write the master took before this call (their
        Celery messages included), have reached ``replicas`` replicas, waiting up to ``timeout_seconds``.

        WAIT covers the writes of the connection that issues it, up to its last one; replication is one
        ordered stream, so a write made here after the messages were sent (on kombu's own connection)
        carries the messages with it. That write only marks records that exist: if a failover
        reconnected us to a master without them, the answer is no.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.eval(_MARK_SENT, 1, job_key(job_id))
            pipe.execute_command("WAIT", replicas, int(timeout_seconds * 1000))
            *present, acknowledged = pipe.execute()
        return all(present) and acknowledged >= replicas

    def delete(self, job: Job) -> None:
        """Remove a job record and its index entries (used when its submission was refused)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job.id), job_stream_key(job.id))
        pipe.zrem(DEADLINES_KEY, job.id)
        pipe.zrem(queued_key(job.model), job.id)
        metrics.unrecord_submitted(pipe, job)
        pipe.execute()

    def start(self, job_id: str, worker: str, instance: str | None = None) -> Job | None:
        """Mark a job running on ``worker`` (process ``instance``).

        None when it is unknown, already has its final result, or is running on an instance that is
        still live, this one included: a running job is taken over only when, inside the same
        transaction, its owner's heartbeat is gone (two deliveries of one job never both run it, on two
        workers or in one). A job whose deadline passed while it was queued comes back ``failed``
        (expired) instead of running.
        """
        instance = instance or worker

        def owner_alive(pipe: Any, job: Job) -> bool:
            if job.status is not JobStatus.RUNNING or job.worker_instance is None:
                return False
            if job.worker_instance == instance:
                return True  # a second delivery to the process that runs it
            owner_key = WORKER_KEY_PREFIX + job.worker_instance
            pipe.watch(owner_key)
            return bool(pipe.exists(owner_key))

        def mutate(job: Job, alive: bool) -> Job | None:
            if job.status.terminal or alive:
                return None
            now = utcnow()
            expired = _expired(job, now)
            if expired is not None:
                return expired
            metrics = job.metrics
            if job.attempts == 0:
                metrics = metrics.model_copy(update={"queue_seconds": _seconds(job.created_at, now)})
            return job.model_copy(
                update={
                    "status": JobStatus.RUNNING,
                    "started_at": now,
                    "worker": worker,
                    "worker_instance": instance,
                    "attempts": job.attempts + 1,
                    "metrics": metrics,
                }
            )

        return self._update(job_id, mutate, read=owner_alive)

    def publish_progress(self, updates: list[ProgressUpdate]) -> ProgressReply:
        """Stream new text and record partial outputs for running jobs, in one round trip.

        Replies which of those jobs have a cancel request (a fallback to the pub/sub message) and which
        are no longer the reporting attempt's (requeued or taken over while it ran: it must stop).
        Partial output lives in the record's ``progress:<attempt>`` field, apart from the document, so no
        transaction is needed; it is shown only for the current attempt of a running job.
        """
        if not updates:
            return ProgressReply(set(), set())
        pipe = self.redis.pipeline(transaction=False)
        for update in updates:
            pipe.hmget(job_key(update.job_id), "cancel", "status", "attempt")
        for update in updates:
            if update.restarted:
                self._event(pipe, update.job_id, "restart", {"attempt": update.attempt})
            if update.delta or update.token_details:
                token: dict[str, Any] = {"text": update.delta, "index": update.tokens, "attempt": update.attempt}
                if update.token_details is not None:
                    token["tokens"] = update.token_details
                self._event(pipe, update.job_id, "token", token)
            if update.output is not None:
                pipe.hset(job_key(update.job_id), _progress_field(update.attempt), update.output.model_dump_json())
        states = pipe.execute()[: len(updates)]
        cancel, superseded = set(), set()
        for update, (flag, status, attempt) in zip(updates, states, strict=True):
            if flag:
                cancel.add(update.job_id)
            if status is None or _text(status) != JobStatus.RUNNING.value:
                superseded.add(update.job_id)
            elif attempt is not None and int(attempt) != update.attempt:
                superseded.add(update.job_id)
        return ProgressReply(cancel, superseded)

    def succeed(
        self, job_id: str, output: JobOutput, inference_seconds: float, attempt: int | None = None
    ) -> Job | None:
        """Record the final output; None when it is not accepted (see ``_finish``)."""
        metrics = _model_metrics(output, inference_seconds)
        return self._finish(job_id, JobStatus.SUCCEEDED, output=output, metrics=metrics, attempt=attempt)

    def fail(
        self,
        job_id: str,
        error: JobError,
        inference_seconds: float | None = None,
        output: JobOutput | None = None,
        attempt: int | None = None,
    ) -> Job | None:
        """Record a failure (with any partial output); None when it is not accepted (see ``_finish``)."""
        metrics = _model_metrics(output, inference_seconds) if output else {"inference_seconds": inference_seconds}
        return self._finish(job_id, JobStatus.FAILED, error=error, output=output, metrics=metrics, attempt=attempt)

    def cancel(self, job_id: str) -> tuple[Job | None, str]:
        """Cancel a job: a queued one at once, a running one by asking its worker. Idempotent."""
        outcome = CancelOutcome.ALREADY_FINAL

        def mutate(job: Job) -> Job | None:
            nonlocal outcome
            if job.status.terminal:
                outcome = CancelOutcome.ALREADY_FINAL
                return None
            if job.status is JobStatus.QUEUED:
                outcome = CancelOutcome.CANCELED
                return job.model_copy(update={"status": JobStatus.CANCELED, "finished_at": utcnow()})
            outcome = CancelOutcome.REQUESTED
            return job.model_copy(update={"cancel_requested": True})

        updated = self._update(job_id, mutate)
        if outcome == CancelOutcome.REQUESTED:
            self.redis.publish(CANCEL_CHANNEL, job_id)
        return (updated or self.get(job_id)), outcome

    def finish_canceled(
        self, job_id: str, output: JobOutput, inference_seconds: float, attempt: int | None = None
    ) -> Job | None:
        """A running job stopped on request, with the text it had so far."""
        metrics = _model_metrics(output, inference_seconds)
        return self._finish(job_id, JobStatus.CANCELED, output=output, metrics=metrics, attempt=attempt)

    def record_device_fault(self, job_id: str, attempt: int, message: str, blamed: bool = True) -> Job | None:
        """Attempt ``attempt`` of a job was in its worker's process when the device failed for good.

        The job goes back to queued, marked for a live reaper to send at once (``to_send_now``).
        ``blamed``: it was in the batch the device failed on, so the fault counts against it (it will run
        alone, so a second fault points at it); at its ``POISON_AFTER``-th fault it fails as a poison job
        instead. A job that was only waiting in the process goes back as it was. None when the attempt no
        longer owns the job.
        """

        def mutate(job: Job) -> Job | None:
            if job.status is not JobStatus.RUNNING or job.attempts != attempt:
                return None
            faults = job.device_faults + (1 if blamed else 0)
            if faults >= POISON_AFTER:
                error = JobError(
                    type="poison_job",
                    message=f"a worker's device failed fatally {faults} times while running this job, the last "
                    f"time with it running alone ({message}); it is not retried",
                )
                return job.model_copy(
                    update={"status": JobStatus.FAILED, "finished_at": utcnow(), "error": error, "device_faults": faults}
                )
            return job.model_copy(
                update={"status": JobStatus.QUEUED, "worker": None, "worker_instance": None, "device_faults": faults}
            )

        # The failing process sends no message (its own consumer could take it as it dies): the job is
        # queued marked for any live reaper to send at once, in the same transaction.
        return self._update(job_id, mutate, queued_score=SEND_NOW)

    def to_send_now(self, model: str, limit: int = 500) -> list[str]:
        """``model``'s queued jobs that have no message at all (handed back by a failing worker)."""
        raw = self.redis.zrangebyscore(queued_key(model), "-inf", SEND_NOW, start=0, num=limit)
        return [_text(item) for item in raw]

    def claim_send_now(self, model: str, job_id: str) -> bool:
        """Claim the sending of a handed-back job: True for exactly one caller (its clock then starts as a
        freshly queued job's, so a lost message is re-sent as usual)."""
        return bool(self._claim_resend(keys=[queued_key(model)], args=[job_id, SEND_NOW, time.time()]))

    def running_jobs(self) -> list[str]:
        """Ids of the jobs currently marked running."""
        return sorted(_text(raw) for raw in self.redis.smembers(RUNNING_KEY))

    def stale_queued(self, model: str, older_than: float, limit: int = 500) -> list[str]:
        """``model``'s interactive jobs queued (or last re-sent) more than ``older_than`` seconds ago and
        still not started, oldest first."""
        cutoff = time.time() - older_than
        raw = self.redis.zrangebyscore(queued_key(model), "-inf", cutoff, start=0, num=limit)
        return [_text(item) for item in raw]

    def claim_resend(self, model: str, job_id: str, older_than: float) -> bool:
        """Claim the re-sending of a queued job's lost message: True for exactly one caller per
        ``older_than`` seconds (the claim restarts the job's clock), however many reapers ask at once."""
        return bool(self._claim_resend(keys=[queued_key(model)], args=[job_id, time.time() - older_than, time.time()]))

    def requeue_if_orphaned(self, job_id: str, live_instances: set[str]) -> Job | None:
        """Put a running job whose worker is no longer live back to queued; None when it is not orphaned.

        The caller then sends it to its queue again. The dead worker's attempt number is now stale, so
        a late result from it is refused (``_finish``); its original message, if Redis ever redelivers
        it, finds the job finished and is acknowledged without running.
        """

        def mutate(job: Job) -> Job | None:
            if job.status is not JobStatus.RUNNING or job.worker_instance in live_instances:
                return None
            log.warning("job %s: worker %s is gone; requeueing (attempt %d)", job.id, job.worker_instance,
                        job.attempts)
            return job.model_copy(update={"status": JobStatus.QUEUED, "worker": None, "worker_instance": None})

        updated = self._update(job_id, mutate)
        if updated is None:
            job = self.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                self.redis.srem(RUNNING_KEY, job_id)  # a stale index entry
        return updated

    def fail_if_stuck(self, job_id: str, grace_seconds: float) -> Job | None:
        """Fail a running job that is ``grace_seconds`` past its deadline (its worker should have stopped it)."""
        error = JobError(type="timeout", message="the job was still running well after its deadline")

        def mutate(job: Job) -> Job | None:
            if job.status is not JobStatus.RUNNING or job.deadline is None:
                return None
            if (utcnow() - job.deadline).total_seconds() < grace_seconds:
                return None
            return job.model_copy(update={"status": JobStatus.FAILED, "finished_at": utcnow(), "error": error})

        return self._update(job_id, mutate)

    def expire_overdue(self, now: datetime | None = None) -> list[str]:
        """Fail queued jobs whose deadline has passed (``error.type = "expired"``); return their ids."""
        cutoff = (now or utcnow()).timestamp()
        expired = []
        for raw in self.redis.zrangebyscore(DEADLINES_KEY, "-inf", cutoff, start=0, num=500):
            job_id = _text(raw)
            if self.expire_if_queued(job_id) is not None:
                expired.append(job_id)
            self.redis.zrem(DEADLINES_KEY, job_id)
        return expired

    def expire_if_queued(self, job_id: str) -> Job | None:
        """Fail a job that is still queued past its deadline; None when it is not."""

        return self._update(job_id, lambda job: _expired(job, utcnow()))

    # -- internals ---------------------------------------------------------------------------------

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        output: JobOutput | None = None,
        error: JobError | None = None,
        metrics: dict[str, Any],
        attempt: int | None = None,
    ) -> Job | None:
        """The one final result: refused once the job has one, or when it comes from a stale attempt
        (``attempt`` given and the job is no longer running that attempt: it was requeued)."""

        def mutate(job: Job) -> Job | None:
            if job.status.terminal:
                log.warning("job %s already %s; a late result was dropped", job.id, job.status.value)
                return None
            if attempt is not None and (job.status is not JobStatus.RUNNING or job.attempts != attempt):
                log.warning("job %s: a result from attempt %d was dropped (the job is %s, attempt %d)",
                            job.id, attempt, job.status.value, job.attempts)
                return None
            return job.model_copy(
                update={
                    "status": status,
                    "finished_at": utcnow(),
                    "output": output,
                    "error": error,
                    "metrics": JobMetrics(**{**job.metrics.model_dump(), **metrics}),
                }
            )

        return self._update(job_id, mutate)

    def _update(
        self,
        job_id: str,
        mutate: Callable[..., Job | None],
        status_event: bool = True,
        read: Callable[[Any, Job], Any] | None = None,
        queued_score: float | None = None,
    ) -> Job | None:
        """Apply ``mutate`` atomically; a concurrent writer makes us re-read and try again.

        ``read(pipe, job)``: watches and reads other keys the change depends on; its answer is passed to
        ``mutate`` as a second argument, and a change to those keys also makes us try again.
        ``queued_score``: a job that becomes queued enters the queued index with this score (default: now;
        ``SEND_NOW``: it has no message and a reaper sends one).
        """
        key = job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "doc")
                    if raw is None:
                        pipe.unwatch()
                        return None
                    before = Job.from_json(raw)
                    updated = mutate(before) if read is None else mutate(before, read(pipe, before))
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, mapping={"status": updated.status.value, "attempt": updated.attempts,
                                            "doc": updated.to_json()})
                    pipe.expire(key, self.retention_seconds)
                    if updated.cancel_requested and not before.cancel_requested:
                        pipe.hset(key, "cancel", "1")
                    if updated.status.terminal:
                        pipe.hdel(key, _progress_field(updated.attempts))
                    if updated.status is JobStatus.RUNNING and before.status is not JobStatus.RUNNING:
                        pipe.sadd(RUNNING_KEY, job_id)
                    elif before.status is JobStatus.RUNNING and updated.status is not JobStatus.RUNNING:
                        pipe.srem(RUNNING_KEY, job_id)
                    if updated.priority_class == "interactive":
                        if updated.status is JobStatus.QUEUED and before.status is not JobStatus.QUEUED:
                            score = time.time() if queued_score is None else queued_score
                            pipe.zadd(queued_key(updated.model), {job_id: score})
                        elif before.status is JobStatus.QUEUED and updated.status is not JobStatus.QUEUED:
                            pipe.zrem(queued_key(updated.model), job_id)
                    if status_event and (updated.status != before.status or updated.cancel_requested != before.cancel_requested):
                        self._event(pipe, job_id, "status", {"status": updated.status.value,
                                                             "cancel_requested": updated.cancel_requested,
                                                             "attempt": updated.attempts})
                    if updated.status.terminal:
                        self._event(pipe, job_id, "done", updated.model_dump(mode="json"))
                        if updated.batch_id is not None:  # the batch's progress, counted exactly once
                            outcome = "completed" if updated.status is JobStatus.SUCCEEDED else "failed"
                            pipe.hincrby(batch_key(updated.batch_id), outcome, 1)
                            if updated.error is not None and updated.error.type == EXPIRED.type:
                                pipe.hincrby(batch_key(updated.batch_id), "expired", 1)
                        pipe.zrem(DEADLINES_KEY, job_id)
                        metrics.record_finished(pipe, updated)
                    _stage_webhook(pipe, before, updated)
                    pipe.publish(job_events_channel(job_id), updated.status.value)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def _event(self, pipe: Any, job_id: str, event: str, data: dict[str, Any]) -> None:
        stream = job_stream_key(job_id)
        payload = json.dumps(data, ensure_ascii=False)
        pipe.xadd(stream, {"event": event, "data": payload}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(stream, self.retention_seconds)


def _stage_webhook(pipe: Any, before: Job, updated: Job) -> None:
    """Queue the webhook this change calls for, if the job asked for it, in the change's own transaction:
    ``completed`` when the job gets its final result, ``started`` when an attempt of it starts running."""
    if updated.status.terminal and not before.status.terminal:
        event = "completed"
    elif updated.status is JobStatus.RUNNING and (before.status is not JobStatus.RUNNING
                                                  or updated.attempts != before.attempts):
        event = "started"
    else:
        return
    if updated.webhook and event in updated.webhook_events:
        outbox.stage(pipe, updated.id, event, updated.attempts)


def _expired(job: Job, now: datetime) -> Job | None:
    """``job`` failed as expired, if it is still queued at or past its deadline; else None."""
    if not job.overdue(now):
        return None
    return job.model_copy(update={"status": JobStatus.FAILED, "finished_at": now, "error": EXPIRED})


def _job_from_fields(fields: dict[bytes, bytes]) -> Job | None:
    """A job record as read from its hash; a running job shows its current attempt's progress."""
    raw = fields.get(b"doc")
    if raw is None:
        return None
    job = Job.from_json(raw)
    # Only the current attempt's report counts: one from an attempt that was replaced is ignored.
    progress = fields.get(_progress_field(job.attempts).encode())
    if progress is not None and job.status is JobStatus.RUNNING:
        job = job.model_copy(update={"output": JobOutput.model_validate_json(progress)})
    return job


def _progress_field(attempt: int) -> str:
    return f"progress:{attempt}"


def _model_metrics(output: JobOutput | None, inference_seconds: float | None) -> dict[str, float | None]:
    tokens = output.generated_tokens if output else 0
    per_token = round(inference_seconds / tokens, 9) if inference_seconds is not None and tokens else None
    return {"inference_seconds": inference_seconds, "seconds_per_token": per_token}


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 6)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


"""A job's event stream, and waiting for a job to end.

Each job has an event log, a capped Redis Stream ``bloomq:job-stream:<id>`` (``status``, ``token``,
``restart`` and a final ``done`` event), written in the same transaction as the change it records, which
is what streaming clients read and resume from (``Last-Event-ID`` = the stream entry id). Status and token
events carry the attempt number: when a job restarts on another worker, a ``status`` event with a higher
attempt tells readers to start the text over, and tokens of a replaced attempt are to be ignored.

Every change of a job is also announced on its pub/sub channel, so a waiter wakes at once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from jobs.connection import as_text
from jobs.keys import job_events_channel, job_stream_key
from jobs.records import read_job
from jobs.schema import Job

STREAM_MAXLEN = 10_000  # events kept per job: every token of the longest BLOOM job, with room to spare
# A waiter re-reads the job at least this often, in case a change's notice was lost (a reconnect).
WAIT_RECHECK_SECONDS = 1.0


def stage_event(pipe: Any, job_id: str, event: str, data: dict[str, Any], retention_seconds: int) -> None:
    """Append ``event`` to the job's stream, in the caller's pipeline, and keep the stream as long as the job."""
    stream = job_stream_key(job_id)
    payload = json.dumps(data, ensure_ascii=False)
    pipe.xadd(stream, {"event": event, "data": payload}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(stream, retention_seconds)


def stage_notice(pipe: Any, job_id: str, status: str) -> None:
    """Announce a change of the job (its status now) to whoever waits on it, in the caller's pipeline."""
    pipe.publish(job_events_channel(job_id), status)


def read_events(client: redis.Redis, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, str]]:
    """Events after stream id ``after`` as (id, event, data), waiting up to ``block_ms`` for one."""
    reply = client.xread({job_stream_key(job_id): after}, count=200, block=block_ms)
    events = []
    for _key, entries in reply or []:
        for entry_id, fields in entries:
            events.append((as_text(entry_id), as_text(fields[b"event"]), as_text(fields[b"data"])))
    return events


def wait_final(client: redis.Redis, job_id: str, timeout: float) -> Job | None:
    """The job once it is terminal, or as it is after ``timeout`` seconds; None when unknown."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        # Subscribe before reading, so a change between the read and the wait is not missed.
        pubsub.subscribe(job_events_channel(job_id))
        job = read_job(client, job_id)
        deadline = time.monotonic() + timeout
        while job is not None and not job.status.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pubsub.get_message(timeout=min(left, WAIT_RECHECK_SECONDS))
            job = read_job(client, job_id)
        return job
    finally:
        pubsub.close()

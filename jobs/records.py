"""A job record as Redis holds it, and reading it back.

Every job lives under ``bloomq:job:<id>``, a hash: ``status`` and ``attempt`` (readable without parsing),
the JSON ``doc`` (the whole job), ``cancel`` once a cancel was requested, ``sent`` once the replica WAIT
marked it, and ``progress:<attempt>``, each running attempt's partial output. The partial output is kept
apart from the document so that a worker's reports need no transaction.
"""

from __future__ import annotations

import redis

from jobs.keys import job_key
from jobs.schema import Job, JobOutput, JobStatus


def progress_field(attempt: int) -> str:
    """The field holding attempt ``attempt``'s partial output."""
    return f"progress:{attempt}"


def job_from_fields(fields: dict[bytes, bytes]) -> Job | None:
    """A job record as read from its hash; a running job shows its current attempt's progress."""
    raw = fields.get(b"doc")
    if raw is None:
        return None
    job = Job.from_json(raw)
    # Only the current attempt's report counts: one from an attempt that was replaced is ignored.
    progress = fields.get(progress_field(job.attempts).encode())
    if progress is not None and job.status is JobStatus.RUNNING:
        job = job.model_copy(update={"output": JobOutput.model_validate_json(progress)})
    return job


def read_job(client: redis.Redis, job_id: str) -> Job | None:
    """The job, or None when it is unknown or expired; a running job shows its latest progress."""
    return job_from_fields(client.hgetall(job_key(job_id)))


def read_jobs(client: redis.Redis, job_ids: list[str]) -> list[Job | None]:
    """Several jobs (as ``read_job`` reads them) in one round trip."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(job_key(job_id))
    return [job_from_fields(fields) for fields in pipe.execute()]

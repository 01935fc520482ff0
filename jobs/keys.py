"""The names of the Redis keys that hold jobs, batches and files, and the channels that announce them.

The webhook outbox, the metrics and the worker directory keep their own keys beside the scripts that
use them (``jobs/outbox.py``, ``jobs/metrics.py``, ``jobs/workers.py``), as does the batch intake
(``jobs/intake.py``): no other module reads or writes those.
"""

from __future__ import annotations

# -- jobs ------------------------------------------------------------------------------------------

JOB_KEY_PREFIX = "bloomq:job:"  # + job id: a hash with the status, the attempt and the JSON ``doc``
JOB_EVENTS_PREFIX = "bloomq:job-events:"  # + job id: the pub/sub channel of its status changes
JOB_STREAM_PREFIX = "bloomq:job-stream:"  # + job id: its event log, a capped Redis Stream
DEADLINES_KEY = "bloomq:deadlines"
RUNNING_KEY = "bloomq:running"  # ids of jobs in state running, for the reaper
# Per model, interactive jobs only: job id -> when it was (re)queued or last re-sent, for the reaper's
# lost-delivery scan. Batch lines wait in their own lists and come back through the taken lists, and a
# model without a live worker is not scanned: neither can hide a lost interactive job behind a backlog.
QUEUED_PREFIX = "bloomq:queued:"
OWNER_JOBS_PREFIX = "bloomq:owner-jobs:"
CANCEL_CHANNEL = "bloomq:cancels"


def job_key(job_id: str) -> str:
    """The Redis key of a job record."""
    return f"{JOB_KEY_PREFIX}{job_id}"


def job_events_channel(job_id: str) -> str:
    """The pub/sub channel that announces a job's status changes."""
    return f"{JOB_EVENTS_PREFIX}{job_id}"


def job_stream_key(job_id: str) -> str:
    """The Redis Stream holding a job's events."""
    return f"{JOB_STREAM_PREFIX}{job_id}"


def queued_key(model: str) -> str:
    """The index of ``model``'s queued interactive jobs (score: when queued or last re-sent)."""
    return f"{QUEUED_PREFIX}{model}"


def owner_jobs_key(owner: str | None) -> str:
    """The index of the jobs one API key made (``-``: those made without a key), scored by creation time."""
    return f"{OWNER_JOBS_PREFIX}{owner or '-'}"


# -- batches and files -----------------------------------------------------------------------------

BATCH_KEY_PREFIX = "bloomq:batch:"
FILE_KEY_PREFIX = "bloomq:file:"
BATCH_LINES_PREFIX = "bloomq:batch-lines:"
OWNER_BATCHES_PREFIX = "bloomq:batches:"
OWNER_FILES_PREFIX = "bloomq:files:"  # + owner: file id -> when it was uploaded
OWNER_FILE_BYTES_PREFIX = "bloomq:file-bytes:"  # + owner: file id -> its size, for the per-key byte cap
BATCH_QUEUE_PREFIX = "bloomq:batch-queue:"  # + model + ":" + owner: one list of job ids per key
BATCH_OWNERS_PREFIX = "bloomq:batch-owners:"  # + model: the keys with lines waiting
BATCH_TURN_PREFIX = "bloomq:batch-turn:"  # + model: whose turn it is
BATCH_TAKEN_PREFIX = "bloomq:batch-taken:"  # + worker instance: lines it took and has not finished


def batch_key(batch_id: str) -> str:
    """The Redis key of a batch record (its line counters live there too)."""
    return f"{BATCH_KEY_PREFIX}{batch_id}"


def batch_lines_key(batch_id: str) -> str:
    """The list of a batch's lines (custom id and job ids)."""
    return f"{BATCH_LINES_PREFIX}{batch_id}"


def file_key(file_id: str) -> str:
    """The Redis key of an uploaded file (its metadata and its bytes)."""
    return f"{FILE_KEY_PREFIX}{file_id}"


def owner_batches_key(owner: str | None) -> str:
    """The index of one API key's batches (the empty name: those made without a key), newest first."""
    return f"{OWNER_BATCHES_PREFIX}{owner or ''}"


def owner_files_keys(owner: str | None) -> tuple[str, str]:
    """The index of one API key's files (by upload time) and the sizes of those files."""
    return f"{OWNER_FILES_PREFIX}{owner or '-'}", f"{OWNER_FILE_BYTES_PREFIX}{owner or '-'}"


def batch_queue_key(model: str, owner: str | None) -> str:
    """The list of one API key's batch lines waiting for ``model``."""
    return f"{BATCH_QUEUE_PREFIX}{model}:{owner or '-'}"


# -- API keys --------------------------------------------------------------------------------------

API_KEY_PREFIX = "bloomq:api-key:"  # + the SHA-256 of the secret: a hash with the key's name, role, limits
API_KEY_NAMES = "bloomq:api-key-names"  # name -> the SHA-256 of its secret


def api_key_key(digest: str) -> str:
    """The Redis key of an API key's record (by the hash of its secret; the secret is never stored)."""
    return f"{API_KEY_PREFIX}{digest}"


# -- quotas and usage ------------------------------------------------------------------------------

QUOTA_TOKENS_PREFIX = "bloomq:quota-tokens:"  # + owner + ":" + UTC day: tokens held and used that day
QUOTA_ACTIVE_PREFIX = "bloomq:quota-active:"  # + owner: its jobs queued or running
USAGE_PREFIX = "bloomq:usage:"  # + UTC day: a hash of "owner|model|hour|kind" -> tokens (or jobs)
USAGE_TOTALS_KEY = "bloomq:usage-totals"  # "owner|model|kind" -> since the start (the per-key metrics)


def quota_tokens_key(owner: str, day: str) -> str:
    return f"{QUOTA_TOKENS_PREFIX}{owner}:{day}"


def quota_active_key(owner: str) -> str:
    return f"{QUOTA_ACTIVE_PREFIX}{owner}"


def usage_key(day: str) -> str:
    return f"{USAGE_PREFIX}{day}"


# -- recent activity (the live dashboard) ----------------------------------------------------------

ACTIVITY_PREFIX = "bloomq:activity:"  # + minute since the epoch: a hash of "model|figure" -> amount


def activity_key(minute: int) -> str:
    return f"{ACTIVITY_PREFIX}{minute}"

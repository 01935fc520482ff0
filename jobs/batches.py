"""Files and batches (the OpenAI Batch API) in Redis, beside the jobs their lines become.

- A file is one hash ``bloomq:file:<id>`` (its metadata and its bytes), kept for the retention period. The
  upload limit (``BLOOMQ_MAX_BATCH_FILE_BYTES``) bounds what one file costs Redis's memory; a deployment that
  needs larger or longer-lived files would keep the bytes in object storage and only the metadata here.
- A batch is a hash ``bloomq:batch:<id>`` (its document, and ``completed``/``failed``/``expired`` line
  counters that the job store bumps in the same transaction as each line's final result, so they count
  every line exactly once) plus a list of its lines (custom id and job ids). Results are not copied: the
  output file is assembled from the job records when it is read.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from jobs.store import batch_key

FILE_KEY_PREFIX = "bloomq:file:"
BATCH_LINES_PREFIX = "bloomq:batch-lines:"
OWNER_BATCHES_PREFIX = "bloomq:batches:"
OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"  # a batch's result files are views of its jobs

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


def _now() -> int:
    return int(time.time())


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None
    status: str = "processed"
    owner: str | None = Field(None, exclude=True)


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int = Field(default_factory=_now)
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    owner: str | None = Field(None, exclude=True)

    @property
    def output_id(self) -> str:
        return f"file-{self.id}{OUTPUT_SUFFIX}"

    @property
    def errors_id(self) -> str:
        return f"file-{self.id}{ERRORS_SUFFIX}"


class BatchLine(BaseModel):
    """One line of a batch: its custom id and the jobs it made (one per prompt and choice)."""

    custom_id: str
    job_ids: list[str]
    request: dict[str, Any] = Field(description="The line's body, as sent.")


class BatchStore:
    """Files and batches, in the same Redis as the jobs."""

    def __init__(self, client: redis.Redis, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds

    # -- files -------------------------------------------------------------------------------------

    def add_file(self, content: bytes, filename: str, purpose: str, owner: str | None) -> FileObject:
        """Keep an uploaded file for the retention period."""
        meta = FileObject(id=f"file-{secrets.token_hex(12)}", bytes=len(content), created_at=_now(),
                          filename=filename, purpose=purpose, expires_at=_now() + self.retention_seconds,
                          owner=owner)
        key = FILE_KEY_PREFIX + meta.id
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"meta": meta.model_dump_json(), "owner": owner or "", "content": content})
        pipe.expire(key, self.retention_seconds)
        pipe.execute()
        return meta

    def file(self, file_id: str) -> FileObject | None:
        raw, owner = self.redis.hmget(FILE_KEY_PREFIX + file_id, "meta", "owner")
        if raw is None:
            return None
        return FileObject.model_validate_json(raw).model_copy(update={"owner": owner.decode() or None})

    def file_content(self, file_id: str) -> bytes | None:
        return self.redis.hget(FILE_KEY_PREFIX + file_id, "content")

    def delete_file(self, file_id: str) -> bool:
        return bool(self.redis.delete(FILE_KEY_PREFIX + file_id))

    # -- batches -----------------------------------------------------------------------------------

    def add_batch(self, batch: BatchObject) -> None:
        """Store a new batch (listed for its owner, newest first)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch.id), mapping={"doc": self._dump(batch), "completed": 0, "failed": 0, "expired": 0})
        pipe.expire(batch_key(batch.id), self._keep(batch))
        pipe.zadd(OWNER_BATCHES_PREFIX + (batch.owner or ""), {batch.id: time.time()})
        pipe.execute()

    def save(self, batch: BatchObject) -> None:
        """Write the batch's document (its counters are the job store's)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch.id), "doc", self._dump(batch))
        pipe.expire(batch_key(batch.id), self._keep(batch))
        pipe.execute()

    def add_lines(self, batch_id: str, lines: list[BatchLine]) -> None:
        key = BATCH_LINES_PREFIX + batch_id
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(lines), 500):
            pipe.rpush(key, *(line.model_dump_json() for line in lines[start : start + 500]))
        pipe.expire(key, self.retention_seconds + 7 * 86400)
        pipe.execute()

    def lines(self, batch_id: str) -> Iterator[BatchLine]:
        for chunk in self.line_chunks(batch_id):
            yield from chunk

    def line_chunks(self, batch_id: str, size: int = 500) -> Iterator[list[BatchLine]]:
        """The batch's lines, ``size`` at a time (one Redis read each)."""
        key = BATCH_LINES_PREFIX + batch_id
        for start in range(0, self.redis.llen(key), size):
            yield [BatchLine.model_validate_json(raw) for raw in self.redis.lrange(key, start, start + size - 1)]

    def batch(self, batch_id: str) -> tuple[BatchObject, dict[str, int]] | None:
        """The batch document and its line counters (``completed``, ``failed``, ``expired``)."""
        fields = self.redis.hgetall(batch_key(batch_id))
        raw = fields.get(b"doc")
        if raw is None:
            return None
        data = json.loads(raw)
        owner = data.pop("_owner", None)
        counts = {name: int(fields.get(name.encode(), 0)) for name in ("completed", "failed", "expired")}
        return BatchObject.model_validate(data).model_copy(update={"owner": owner}), counts

    def batch_ids(self, owner: str | None) -> list[str]:
        """The owner's batches, newest first."""
        return [raw.decode() for raw in self.redis.zrevrange(OWNER_BATCHES_PREFIX + (owner or ""), 0, -1)]

    def _dump(self, batch: BatchObject) -> str:
        return json.dumps({**batch.model_dump(mode="json"), "_owner": batch.owner})

    def _keep(self, batch: BatchObject) -> int:
        """Seconds to keep a batch: its window, then the retention period."""
        window = max(0, (batch.expires_at or _now()) - _now())
        return window + self.retention_seconds


BATCH_QUEUE_PREFIX = "bloomq:batch-queue:"  # + model + ":" + owner: one list of job ids per key
BATCH_OWNERS_PREFIX = "bloomq:batch-owners:"  # + model: the keys with lines waiting
BATCH_TURN_PREFIX = "bloomq:batch-turn:"  # + model: whose turn it is
BATCH_TAKEN_PREFIX = "bloomq:batch-taken:"  # + worker instance: lines it took and has not finished

# Take the next line in turn: each key with waiting lines gives one, round robin, so one key's huge batch
# does not make another key's small one wait for it. Atomic, so keys leave the rotation exactly when empty.
_TAKE = """
local owners = redis.call('SMEMBERS', KEYS[1])
if #owners == 0 then return nil end
table.sort(owners)
local turn = redis.call('INCR', KEYS[2])
for i = 0, #owners - 1 do
  local owner = owners[((turn + i) % #owners) + 1]
  local id = redis.call('LPOP', ARGV[1] .. owner)
  if id then
    redis.call('RPUSH', KEYS[3], id)
    return id
  end
  redis.call('SREM', KEYS[1], owner)
end
return nil
"""


class BatchQueue:
    """Batch lines waiting for a worker: per model, one list per API key, taken in turn.

    Batch lines do not go through Celery: a worker's feeder takes them while its engine has rows to
    spare, so they never fill the threads that bring interactive jobs in. A worker records the lines it
    took until they end; those of a worker that died are put back by the reaper (``recover``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(_TAKE)

    @staticmethod
    def _list(model: str, owner: str | None) -> str:
        return f"{BATCH_QUEUE_PREFIX}{model}:{owner or '-'}"

    def push(self, model: str, owner: str | None, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(self._list(model, owner), job_id)
        pipe.sadd(BATCH_OWNERS_PREFIX + model, owner or "-")
        pipe.execute()

    def take(self, model: str, instance: str) -> str | None:
        """The next job id in turn (recorded as taken by ``instance``), or None when no line waits."""
        raw = self._take(keys=[BATCH_OWNERS_PREFIX + model, BATCH_TURN_PREFIX + model, BATCH_TAKEN_PREFIX + instance],
                         args=[f"{BATCH_QUEUE_PREFIX}{model}:"])
        return raw.decode() if raw is not None else None

    def done(self, instance: str, job_id: str) -> None:
        """``instance`` has finished with a line it took."""
        self.redis.lrem(BATCH_TAKEN_PREFIX + instance, 1, job_id)

    def taken_by_the_dead(self, live_instances: set[str]) -> dict[str, list[str]]:
        """Lines taken by worker instances that are no longer live: instance -> job ids."""
        found = {}
        for raw in self.redis.scan_iter(match=BATCH_TAKEN_PREFIX + "*", count=500):
            instance = raw.decode().removeprefix(BATCH_TAKEN_PREFIX)
            if instance not in live_instances:
                found[instance] = [item.decode() for item in self.redis.lrange(raw, 0, -1)]
        return found

    def forget_taken(self, instance: str) -> None:
        self.redis.delete(BATCH_TAKEN_PREFIX + instance)

    def depth(self, model: str) -> int:
        owners = [raw.decode() for raw in self.redis.smembers(BATCH_OWNERS_PREFIX + model)]
        return sum(self.redis.llen(f"{BATCH_QUEUE_PREFIX}{model}:{owner}") for owner in owners)

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
from collections.abc import Callable, Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from jobs.store import JOB_KEY_PREFIX, batch_key

FILE_KEY_PREFIX = "bloomq:file:"
BATCH_LINES_PREFIX = "bloomq:batch-lines:"
OWNER_BATCHES_PREFIX = "bloomq:batches:"
OWNER_FILES_PREFIX = "bloomq:files:"  # + owner: file id -> when it was uploaded
OWNER_FILE_BYTES_PREFIX = "bloomq:file-bytes:"  # + owner: file id -> its size, for the per-key byte cap
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # as OpenAI bounds a batch's metadata
MAX_CUSTOM_ID = 512  # characters of a batch line's custom_id
TERMINAL_BATCH = ("failed", "completed", "expired", "cancelled")
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


MAX_WINDOW_SECONDS = 24 * 3600  # the longest completion window offered


def _batch_from_doc(raw: bytes) -> BatchObject:
    data = json.loads(raw)
    owner = data.pop("_owner", None)
    return BatchObject.model_validate(data).model_copy(update={"owner": owner})


def _batch_from_fields(fields: dict[bytes, bytes]) -> tuple[BatchObject, dict[str, int]] | None:
    raw = fields.get(b"doc")
    if raw is None:
        return None
    counts = {name: int(fields.get(name.encode(), 0)) for name in ("completed", "failed", "expired")}
    return _batch_from_doc(raw), counts


# Make room for a file among its owner's: forget files past retention, then refuse (0) when the kept
# ones plus this one would pass the cap (ARGV[3], -1: none), else record it (1). Atomic, so two uploads
# at once cannot both squeeze under the cap.
_RESERVE_FILE = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
for _, id in ipairs(old) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
local cap = tonumber(ARGV[3])
if cap >= 0 then
  local used = 0
  for _, size in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(size) end
  if used + tonumber(ARGV[2]) > cap then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


class BatchStore:
    """Files and batches, in the same Redis as the jobs."""

    def __init__(self, client: redis.Redis, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self._reserve = client.register_script(_RESERVE_FILE)

    # -- files -------------------------------------------------------------------------------------

    def add_file(self, content: bytes, filename: str, purpose: str, owner: str | None,
                 max_owner_bytes: int | None = None) -> FileObject | None:
        """Keep an uploaded file for the retention period; None (nothing kept) when the owner's files
        would then hold more than ``max_owner_bytes``."""
        meta = FileObject(id=f"file-{secrets.token_hex(12)}", bytes=len(content), created_at=_now(),
                          filename=filename, purpose=purpose, expires_at=_now() + self.retention_seconds,
                          owner=owner)
        cap = -1 if max_owner_bytes is None else max_owner_bytes
        index, sizes = self._owner_files(owner)
        now = time.time()  # (finer than created_at: two uploads in one second keep their order)
        if not self._reserve(keys=[index, sizes], args=[meta.id, len(content), cap, now, now - self.retention_seconds]):
            return None
        key = FILE_KEY_PREFIX + meta.id
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"meta": meta.model_dump_json(), "owner": owner or "", "content": content})
        pipe.expire(key, self.retention_seconds)
        for owned in (index, sizes):
            pipe.expire(owned, self.retention_seconds)
        pipe.execute()
        return meta

    def stored_bytes(self, owner: str | None) -> int:
        """What the owner's kept files add up to."""
        return sum(int(size) for size in self.redis.hvals(self._owner_files(owner)[1]))

    def files(self, owner: str | None, after: str | None, limit: int, newest_first: bool = True
              ) -> tuple[list[FileObject], bool]:
        """A page of the owner's uploaded files (those still kept) after file id ``after``, and whether
        more follow."""
        index, _ = self._owner_files(owner)
        ids = [raw.decode() for raw in (self.redis.zrevrange(index, 0, -1) if newest_first
                                        else self.redis.zrange(index, 0, -1))]
        start = ids.index(after) + 1 if after in ids else 0
        found: list[FileObject] = []
        for file_id in ids[start:]:
            if len(found) == limit:
                return found, True
            meta = self.file(file_id)
            if meta is None:
                self._forget_file(owner, file_id)
                continue
            found.append(meta)
        return found, False

    def _owner_files(self, owner: str | None) -> tuple[str, str]:
        return OWNER_FILES_PREFIX + (owner or "-"), OWNER_FILE_BYTES_PREFIX + (owner or "-")

    def _forget_file(self, owner: str | None, file_id: str) -> None:
        index, sizes = self._owner_files(owner)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(index, file_id)
        pipe.hdel(sizes, file_id)
        pipe.execute()

    def file(self, file_id: str) -> FileObject | None:
        raw, owner = self.redis.hmget(FILE_KEY_PREFIX + file_id, "meta", "owner")
        if raw is None:
            return None
        return FileObject.model_validate_json(raw).model_copy(update={"owner": owner.decode() or None})

    def file_content(self, file_id: str) -> bytes | None:
        return self.redis.hget(FILE_KEY_PREFIX + file_id, "content")

    def delete_file(self, file_id: str) -> bool:
        meta = self.file(file_id)
        if meta is not None:
            self._forget_file(meta.owner, file_id)
        return bool(self.redis.delete(FILE_KEY_PREFIX + file_id))

    # -- batches -----------------------------------------------------------------------------------

    def stage_batch(self, pipe: Any, batch: BatchObject) -> None:
        """Add the writes that store a new batch (listed for its owner, newest first) to a transaction."""
        pipe.hset(batch_key(batch.id), mapping={"doc": self._dump(batch), "completed": 0, "failed": 0, "expired": 0})
        pipe.expire(batch_key(batch.id), self._keep(batch))
        index = OWNER_BATCHES_PREFIX + (batch.owner or "")
        pipe.zadd(index, {batch.id: time.time()})
        # Nothing listed is older than the longest window plus the retention period: trim the rest.
        pipe.zremrangebyscore(index, "-inf", time.time() - self.retention_seconds - 2 * MAX_WINDOW_SECONDS)

    def update(self, batch_id: str, change: Callable[[BatchObject], BatchObject | None],
               also: Callable[[Any], None] | None = None) -> BatchObject | None:
        """Apply ``change`` to the batch's document atomically (a compare-and-set: a concurrent write makes
        it re-read and decide again); None when the batch is gone or ``change`` declines. ``also(pipe)``
        adds writes to the same transaction."""
        key = batch_key(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "doc")
                    if raw is None:
                        pipe.unwatch()
                        return None
                    updated = change(self._load(raw))
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, "doc", self._dump(updated))
                    pipe.expire(key, self._keep(updated))
                    if also is not None:
                        also(pipe)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def stage_lines(self, pipe: Any, batch_id: str, lines: list[BatchLine]) -> None:
        """Add the writes that store a batch's lines to a transaction."""
        key = BATCH_LINES_PREFIX + batch_id
        for start in range(0, len(lines), 500):
            pipe.rpush(key, *(line.model_dump_json() for line in lines[start : start + 500]))
        pipe.expire(key, self.retention_seconds + 2 * MAX_WINDOW_SECONDS)

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
        return _batch_from_fields(self.redis.hgetall(batch_key(batch_id)))

    def batches(self, owner: str | None, after: str | None, limit: int
                ) -> tuple[list[tuple[BatchObject, dict[str, int]]], bool]:
        """A page of the owner's batches (newest first) after batch id ``after``, and whether more follow.
        Batches gone past their retention are skipped and dropped from the owner's list."""
        index = OWNER_BATCHES_PREFIX + (owner or "")
        ids = [raw.decode() for raw in self.redis.zrevrange(index, 0, -1)]
        start = ids.index(after) + 1 if after in ids else 0
        found: list[tuple[BatchObject, dict[str, int]]] = []
        ids = ids[start:]
        for offset in range(0, len(ids), 100):
            chunk = ids[offset : offset + 100]
            pipe = self.redis.pipeline(transaction=False)
            for batch_id in chunk:
                pipe.hgetall(batch_key(batch_id))
            for batch_id, fields in zip(chunk, pipe.execute(), strict=True):
                item = _batch_from_fields(fields)
                if item is None:
                    self.redis.zrem(index, batch_id)
                    continue
                if len(found) == limit:
                    return found, True
                found.append(item)
        return found, False

    def _load(self, raw: bytes) -> BatchObject:
        return _batch_from_doc(raw)

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

# Put a dead worker's taken lines back (those still queued: never started), in their order, then forget
# them, all at once. The job's model and owner are read from its record (JSON in the ``doc`` field).
_RETURN = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local back = {}
for i = #ids, 1, -1 do
  local id = ids[i]
  local fields = redis.call('HMGET', ARGV[1] .. id, 'status', 'doc')
  if fields[1] == 'queued' and fields[2] then
    local doc = cjson.decode(fields[2])
    local owner = doc['owner']
    if type(owner) ~= 'string' or owner == '' then owner = '-' end
    redis.call('LPUSH', ARGV[2] .. doc['model'] .. ':' .. owner, id)
    redis.call('SADD', ARGV[3] .. doc['model'], owner)
    table.insert(back, id)
  end
end
redis.call('DEL', KEYS[1])
return back
"""


class BatchQueue:
    """Batch lines waiting for a worker: per model, one list per API key, taken in turn.

    Batch lines do not go through Celery: a worker's feeder takes them while its engine has rows to
    spare, so they never fill the threads that bring interactive jobs in. A worker records the lines it
    took until they end; those of a worker that died are put back by the reaper (``recover``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(_TAKE)
        self._return = client.register_script(_RETURN)

    @staticmethod
    def _list(model: str, owner: str | None) -> str:
        return f"{BATCH_QUEUE_PREFIX}{model}:{owner or '-'}"

    def push(self, model: str, owner: str | None, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self.stage_push(pipe, model, owner, job_id)
        pipe.execute()

    def stage_push(self, pipe: Any, model: str, owner: str | None, job_id: str) -> None:
        """Add the writes that queue a line to a transaction."""
        pipe.rpush(self._list(model, owner), job_id)
        pipe.sadd(BATCH_OWNERS_PREFIX + model, owner or "-")

    def withdraw(self, model: str, owner: str | None, job_id: str) -> None:
        """Take back a line that was queued (its submission was refused after all)."""
        self.redis.lrem(self._list(model, owner), 1, job_id)

    def take(self, model: str, instance: str) -> str | None:
        """The next job id in turn (recorded as taken by ``instance``), or None when no line waits."""
        raw = self._take(keys=[BATCH_OWNERS_PREFIX + model, BATCH_TURN_PREFIX + model, BATCH_TAKEN_PREFIX + instance],
                         args=[f"{BATCH_QUEUE_PREFIX}{model}:"])
        return raw.decode() if raw is not None else None

    def done(self, instance: str, job_id: str) -> None:
        """``instance`` has finished with a line it took."""
        self.redis.lrem(BATCH_TAKEN_PREFIX + instance, 1, job_id)

    def dead_takers(self, live_instances: set[str]) -> list[str]:
        """Worker instances that are no longer live and still hold lines they took."""
        found = []
        for raw in self.redis.scan_iter(match=BATCH_TAKEN_PREFIX + "*", count=500):
            instance = raw.decode().removeprefix(BATCH_TAKEN_PREFIX)
            if instance not in live_instances:
                found.append(instance)
        return found

    def return_taken(self, instance: str) -> list[str]:
        """Put the lines ``instance`` took and never started back at the front of their lists, and forget
        what it took; the ids put back. One script: however many reapers do this at once, each line comes
        back exactly once (lines that started come back as orphaned running jobs instead)."""
        raw = self._return(keys=[BATCH_TAKEN_PREFIX + instance],
                           args=[JOB_KEY_PREFIX, BATCH_QUEUE_PREFIX, BATCH_OWNERS_PREFIX])
        return [item.decode() for item in raw]

    def depth(self, model: str) -> int:
        owners = [raw.decode() for raw in self.redis.smembers(BATCH_OWNERS_PREFIX + model)]
        return sum(self.redis.llen(f"{BATCH_QUEUE_PREFIX}{model}:{owner}") for owner in owners)

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

from jobs.keys import batch_key, batch_lines_key, file_key, owner_batches_key, owner_files_keys

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
        index, sizes = owner_files_keys(owner)
        now = time.time()  # (finer than created_at: two uploads in one second keep their order)
        if not self._reserve(keys=[index, sizes], args=[meta.id, len(content), cap, now, now - self.retention_seconds]):
            return None
        key = file_key(meta.id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"meta": meta.model_dump_json(), "owner": owner or "", "content": content})
        pipe.expire(key, self.retention_seconds)
        for owned in (index, sizes):
            pipe.expire(owned, self.retention_seconds)
        pipe.execute()
        return meta

    def stored_bytes(self, owner: str | None) -> int:
        """What the owner's kept files add up to."""
        return sum(int(size) for size in self.redis.hvals(owner_files_keys(owner)[1]))

    def files(self, owner: str | None, after: str | None, limit: int, newest_first: bool = True
              ) -> tuple[list[FileObject], bool]:
        """A page of the owner's uploaded files (those still kept) after file id ``after``, and whether
        more follow."""
        index, _ = owner_files_keys(owner)
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

    def _forget_file(self, owner: str | None, file_id: str) -> None:
        index, sizes = owner_files_keys(owner)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(index, file_id)
        pipe.hdel(sizes, file_id)
        pipe.execute()

    def file(self, file_id: str) -> FileObject | None:
        raw, owner = self.redis.hmget(file_key(file_id), "meta", "owner")
        if raw is None:
            return None
        return FileObject.model_validate_json(raw).model_copy(update={"owner": owner.decode() or None})

    def file_content(self, file_id: str) -> bytes | None:
        return self.redis.hget(file_key(file_id), "content")

    def delete_file(self, file_id: str) -> bool:
        meta = self.file(file_id)
        if meta is not None:
            self._forget_file(meta.owner, file_id)
        return bool(self.redis.delete(file_key(file_id)))

    # -- batches -----------------------------------------------------------------------------------

    def stage_batch(self, pipe: Any, batch: BatchObject) -> None:
        """Add the writes that store a new batch (listed for its owner, newest first) to a transaction."""
        pipe.hset(batch_key(batch.id), mapping={"doc": self._dump(batch), "completed": 0, "failed": 0, "expired": 0})
        pipe.expire(batch_key(batch.id), self._keep(batch))
        index = owner_batches_key(batch.owner)
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
        key = batch_lines_key(batch_id)
        for start in range(0, len(lines), 500):
            pipe.rpush(key, *(line.model_dump_json() for line in lines[start : start + 500]))
        pipe.expire(key, self.retention_seconds + 2 * MAX_WINDOW_SECONDS)

    def lines(self, batch_id: str) -> Iterator[BatchLine]:
        for chunk in self.line_chunks(batch_id):
            yield from chunk

    def line_chunks(self, batch_id: str, size: int = 500) -> Iterator[list[BatchLine]]:
        """The batch's lines, ``size`` at a time (one Redis read each)."""
        key = batch_lines_key(batch_id)
        for start in range(0, self.redis.llen(key), size):
            yield [BatchLine.model_validate_json(raw) for raw in self.redis.lrange(key, start, start + size - 1)]

    def batch(self, batch_id: str) -> tuple[BatchObject, dict[str, int]] | None:
        """The batch document and its line counters (``completed``, ``failed``, ``expired``)."""
        return _batch_from_fields(self.redis.hgetall(batch_key(batch_id)))

    def batches(self, owner: str | None, after: str | None, limit: int
                ) -> tuple[list[tuple[BatchObject, dict[str, int]]], bool]:
        """A page of the owner's batches (newest first) after batch id ``after``, and whether more follow.
        Batches gone past their retention are skipped and dropped from the owner's list."""
        index = owner_batches_key(owner)
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

"""Where a job waits for a worker: an interactive job in its model's Celery queue, a batch line in its API
key's batch list (``BatchQueue``), which the workers' batch feeders take from in turn. ``enqueue`` picks."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from jobs.celery_app import send_generate
from jobs.keys import (
    BATCH_OWNERS_PREFIX,
    BATCH_QUEUE_PREFIX,
    BATCH_TAKEN_PREFIX,
    BATCH_TURN_PREFIX,
    JOB_KEY_PREFIX,
    batch_queue_key,
)
from jobs.schema import Job

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

    def push(self, model: str, owner: str | None, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self.stage_push(pipe, model, owner, job_id)
        pipe.execute()

    def stage_push(self, pipe: Any, model: str, owner: str | None, job_id: str) -> None:
        """Add the writes that queue a line to a transaction."""
        pipe.rpush(batch_queue_key(model, owner), job_id)
        pipe.sadd(BATCH_OWNERS_PREFIX + model, owner or "-")

    def withdraw(self, model: str, owner: str | None, job_id: str) -> None:
        """Take back a line that was queued (its submission was refused after all)."""
        self.redis.lrem(batch_queue_key(model, owner), 1, job_id)

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


def enqueue(app: Celery, batch_queue: BatchQueue, job: Job) -> None:
    """Send ``job`` to where it waits for a worker: its model's Celery queue, or, for a batch line, its
    key's batch list (taken by the workers' batch feeders)."""
    if job.priority_class == "batch":
        batch_queue.push(job.model, job.owner, job.id)
    else:
        send_generate(app, job.id, job.queue)

"""The webhook outbox: deliveries wait in Redis until a worker process gets them through (at least once).

A delivery is written in the same transaction as the job change that calls for it (``jobs/steps.py``),
so a crash loses neither. It waits in a sorted set scored by when it is next due, with its data in a hash.
A worker claims due deliveries atomically (a Lua script) by moving their score to the end of a lease and
recording a claim token: two claimers never hold one delivery at once, and the deliveries of a claimer
that died come back when its lease ends. Success removes a delivery; a failure makes it due again 2, 4, 8
and 16 s later; after the ``MAX_ATTEMPTS``-th attempt it is dropped.

A delivery's id names the event, not the attempt (``<job id>:completed``, ``<job id>:started:<attempt of
the job>``): every try of it, from any worker, before or after a crash, carries the same id, so a receiver
can drop repeats.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

DUE_KEY = "bloomq:webhooks:due"  # delivery id -> when it is next due, or when its claim lapses (Unix seconds)
DELIVERIES_KEY = "bloomq:webhooks:deliveries"  # delivery id -> the delivery (JSON)
CLAIMS_KEY = "bloomq:webhooks:claims"  # delivery id -> the token of the claim that holds it
MAX_ATTEMPTS = 5

# Claims up to ARGV[3] deliveries due at ARGV[1]: each counts one more attempt (a claim that lapses counts
# too, so a delivery that keeps outliving its lease still ends), holds token ARGV[4], and is due again at
# ARGV[2] unless its claimer reschedules or removes it first.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    local delivery = cjson.decode(raw)
    delivery['attempt'] = delivery['attempt'] + 1
    raw = cjson.encode(delivery)
    redis.call('HSET', KEYS[2], id, raw)
    redis.call('HSET', KEYS[3], id, ARGV[4])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
    table.insert(claimed, raw)
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return claimed
"""
# Ends claim ARGV[2] on delivery ARGV[1]: removes the delivery, or, with a due time ARGV[3], makes it due
# then. A claim that lapsed and was taken by another worker is no longer ours: nothing changes.
_RELEASE = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
end
return 1
"""
_KEYS = [DUE_KEY, DELIVERIES_KEY, CLAIMS_KEY]


def event_id(job_id: str, event: str, job_attempt: int) -> str:
    """The id of a job's ``event``: a job completes once, and starts once per attempt."""
    return f"{job_id}:completed" if event == "completed" else f"{job_id}:{event}:{job_attempt}"


def retry_delay(attempt: int) -> int:
    """Seconds before the next try after failed attempt ``attempt`` (1-based): 2, 4, 8, 16."""
    return 2**attempt


@dataclass(frozen=True)
class Delivery:
    """One event of one job to deliver; ``attempt``: the tries claimed so far (the current one included)."""

    id: str
    job_id: str
    event: str
    attempt: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Delivery:
        data = json.loads(raw)
        return cls(id=data["id"], job_id=data["job_id"], event=data["event"], attempt=int(data["attempt"]))


@dataclass(frozen=True)
class Claim:
    """A delivery held by one claimer until it releases it or its lease lapses."""

    delivery: Delivery
    token: str


def stage(pipe: Any, job_id: str, event: str, job_attempt: int) -> None:
    """Queue the delivery of a job's ``event``, due now, inside the caller's transaction (``pipe`` in MULTI)."""
    delivery = Delivery(id=event_id(job_id, event, job_attempt), job_id=job_id, event=event)
    pipe.hset(DELIVERIES_KEY, delivery.id, delivery.to_json())
    pipe.zadd(DUE_KEY, {delivery.id: time.time()})


class Outbox:
    """Claim, reschedule and remove pending webhook deliveries."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    def claim(self, limit: int, lease_seconds: float) -> list[Claim]:
        """Up to ``limit`` due deliveries, held for ``lease_seconds``."""
        now = time.time()
        token = uuid.uuid4().hex
        raw = self._claim(keys=_KEYS, args=[repr(now), repr(now + lease_seconds), limit, token])
        return [Claim(Delivery.from_json(item), token) for item in raw]

    def complete(self, claim: Claim) -> bool:
        """Remove a delivery (done, or given up); False when the claim had lapsed and another took it."""
        return bool(self._release(keys=_KEYS, args=[claim.delivery.id, claim.token, ""]))

    def retry(self, claim: Claim, delay: float) -> bool:
        """Make a delivery due again in ``delay`` seconds; False when the claim had lapsed and another took it."""
        return bool(self._release(keys=_KEYS, args=[claim.delivery.id, claim.token, repr(time.time() + delay)]))

    def pending(self) -> dict[str, tuple[Delivery, float]]:
        """Every delivery waiting or under way, by id, with when it is next due (or its claim lapses)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(DELIVERIES_KEY)
        pipe.zrange(DUE_KEY, 0, -1, withscores=True)
        deliveries, due = pipe.execute()
        scores = {_text(member): score for member, score in due}
        found = (Delivery.from_json(raw) for raw in deliveries.values())
        return {d.id: (d, scores[d.id]) for d in found if d.id in scores}

    def claimed(self) -> set[str]:
        """Ids of the deliveries a claimer holds (or held, until its lease lapses and another claims them)."""
        return {_text(raw) for raw in self.redis.hkeys(CLAIMS_KEY)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

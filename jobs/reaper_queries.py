"""The reaper's questions to the job indexes: which jobs run, which queued jobs lost their message or
never had one, which deadlines passed; and its claims, so that of several reapers one acts on a job."""

from __future__ import annotations

import time

import redis

from jobs.connection import as_text
from jobs.keys import DEADLINES_KEY, RUNNING_KEY, queued_key

SEND_NOW = -1.0  # a queued job's score in its model's index when it has no message at all: send one at once
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


class ReaperQueries:
    """Read and claim the entries of the running, queued and deadline indexes."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim_resend = client.register_script(_CLAIM_RESEND)

    def running_jobs(self) -> list[str]:
        """Ids of the jobs currently marked running."""
        return sorted(as_text(raw) for raw in self.redis.smembers(RUNNING_KEY))

    def forget_running(self, job_id: str) -> None:
        """Drop a stale entry of the running set (the job is no longer running)."""
        self.redis.srem(RUNNING_KEY, job_id)

    def to_send_now(self, model: str, limit: int = 500) -> list[str]:
        """``model``'s queued jobs that have no message at all (handed back by a failing worker)."""
        raw = self.redis.zrangebyscore(queued_key(model), "-inf", SEND_NOW, start=0, num=limit)
        return [as_text(item) for item in raw]

    def claim_send_now(self, model: str, job_id: str) -> bool:
        """Claim the sending of a handed-back job: True for exactly one caller (its clock then starts as a
        freshly queued job's, so a lost message is re-sent as usual)."""
        return bool(self._claim_resend(keys=[queued_key(model)], args=[job_id, SEND_NOW, time.time()]))

    def stale_queued(self, model: str, older_than: float, limit: int = 500) -> list[str]:
        """``model``'s interactive jobs queued (or last re-sent) more than ``older_than`` seconds ago and
        still not started, oldest first."""
        cutoff = time.time() - older_than
        raw = self.redis.zrangebyscore(queued_key(model), "-inf", cutoff, start=0, num=limit)
        return [as_text(item) for item in raw]

    def claim_resend(self, model: str, job_id: str, older_than: float) -> bool:
        """Claim the re-sending of a queued job's lost message: True for exactly one caller per
        ``older_than`` seconds (the claim restarts the job's clock), however many reapers ask at once."""
        return bool(self._claim_resend(keys=[queued_key(model)], args=[job_id, time.time() - older_than, time.time()]))

    def past_deadline(self, cutoff: float, limit: int = 500) -> list[str]:
        """Jobs whose deadline (a Unix time) is at or before ``cutoff``."""
        return [as_text(raw) for raw in self.redis.zrangebyscore(DEADLINES_KEY, "-inf", cutoff, start=0, num=limit)]

    def forget_deadline(self, job_id: str) -> None:
        """Drop a job's entry from the deadline index."""
        self.redis.zrem(DEADLINES_KEY, job_id)

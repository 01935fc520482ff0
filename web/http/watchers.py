"""Caps on watchers: the event streams and long polls a web process holds open while they wait.

A watcher costs little under gevent (a parked greenlet and a Redis connection), but not nothing, so two
caps keep one client, or the crowd, from taking every connection:

- per API key (per client address with keys off), shared by every web process and machine: a Redis sorted
  set per key whose members are watcher ids scored with the time their slot expires -- the watch's own
  longest duration plus a grace. A process that dies holding slots leaks them only until then: every
  acquisition first drops the expired ones. Over the cap: ``429 too_many_watchers``.
- per web process, counted in memory (it protects this process's connections and memory): ``503``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from types import TracebackType

import redis
from flask import current_app

from web.http.errors import ApiError
from web.http.limits import who

log = logging.getLogger(__name__)

WATCHERS_PREFIX = "bloomq:watchers:"
RETRY_AFTER_SECONDS = 5  # a stream ends, or resumes elsewhere, within seconds: try again then
EXPIRY_GRACE_SECONDS = 30.0  # slack past a watch's longest duration before its slot counts as leaked

# Atomic check-and-add with Redis's clock, so web machines with skewed clocks agree on what has expired.
_ACQUIRE = """
local key, limit, seconds, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, now + seconds, member)
local ttl = math.ceil(seconds)
if redis.call('TTL', key) < ttl then
  redis.call('EXPIRE', key, ttl)
end
return 1
"""


def watchers_key(who: str) -> str:
    """The sorted set holding one key's (or client address's) watcher slots."""
    return f"{WATCHERS_PREFIX}{who}"


@dataclass
class Watch:
    """A held watcher slot. ``release`` is idempotent; a ``with`` block releases it."""

    slots: WatcherSlots
    who: str
    member: str
    released: bool = field(default=False)

    def release(self) -> None:
        """Give the slot back (at the end of the stream or long poll, or when the client went away)."""
        if self.released:
            return
        self.released = True
        self.slots.release(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class WatcherSlots:
    """Hands out watcher slots within the per-key (Redis) and per-process (memory) caps."""

    def __init__(
        self, client: redis.Redis, per_key: int, per_process: int, grace_seconds: float = EXPIRY_GRACE_SECONDS
    ) -> None:
        self.redis = client
        self.per_key = per_key
        self.per_process = per_process
        self.grace_seconds = grace_seconds
        self._acquire_script = client.register_script(_ACQUIRE)
        self._lock = threading.Lock()  # a gevent lock once the worker has monkey-patched threading
        self._held = 0

    @property
    def held(self) -> int:
        """Watchers this process holds now."""
        return self._held

    def acquire(self, who: str, seconds: float) -> Watch:
        """A slot for a watch lasting at most ``seconds``, or a 503 (this process is full) / 429 ApiError."""
        with self._lock:
            if self._held >= self.per_process:
                raise ApiError(
                    503, "too_many_watchers",
                    f"this web process already holds {self.per_process} event streams and long polls "
                    f"(BLOOMQ_MAX_WATCHERS); retry in {RETRY_AFTER_SECONDS} s",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._held += 1
        member = uuid.uuid4().hex
        try:
            granted = self._acquire_script(
                keys=[watchers_key(who)], args=[self.per_key, seconds + self.grace_seconds, member]
            )
        except BaseException:
            self._give_back()
            raise
        if not granted:
            self._give_back()
            raise ApiError(
                429, "too_many_watchers",
                f"this client already holds {self.per_key} event streams and long polls, the most allowed "
                f"per API key (BLOOMQ_MAX_WATCHERS_PER_KEY); close one or retry in {RETRY_AFTER_SECONDS} s",
                retry_after=RETRY_AFTER_SECONDS,
            )
        return Watch(self, who, member)

    def release(self, watch: Watch) -> None:
        """Give ``watch``'s slot back; use ``Watch.release``, which does this once."""
        self._give_back()
        try:
            self.redis.zrem(watchers_key(watch.who), watch.member)
        except redis.RedisError as exc:
            # Nothing to answer any more (the response is over): the slot expires by itself.
            log.warning("could not release a watcher slot of %s (it expires by itself): %s", watch.who, exc)

    def _give_back(self) -> None:
        with self._lock:
            self._held -= 1


def watch(seconds: float) -> Watch:
    """A watcher slot for this client, held while a long poll or stream waits (429/503 when full)."""
    slots: WatcherSlots = current_app.extensions["bloomq.watchers"]
    return slots.acquire(who(), seconds)

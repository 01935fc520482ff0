"""The connection to Redis: a client with short timeouts, a master found by a majority of the sentinels,
and the replica WAIT that tells whether new jobs survive a failover."""

from __future__ import annotations

import collections
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from config.sentinel import DEFAULT_SENTINEL_MASTER, parse_sentinel_url
from jobs.keys import job_key

# Marks a job record as sent, if it exists (a write WAIT can follow; HSET propagates even when unchanged).
_MARK_SENT = ("if redis.call('HEXISTS', KEYS[1], 'doc') == 1 then redis.call('HSET', KEYS[1], 'sent', '1') return 1 end "
              "return 0")


def connect(url: str, sentinel_master: str = DEFAULT_SENTINEL_MASTER) -> redis.Redis:
    """A Redis client with short timeouts, so a dead Redis is reported instead of hanging a request.

    For a ``sentinel://`` URL the client asks the sentinels where the master named ``sentinel_master``
    is, at every (re)connection: after a failover it finds the new master without a restart, and a
    connection to a former master that was turned into a replica is dropped at its first refused write.
    """
    options: dict[str, Any] = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 15,
                               "retry_on_timeout": True}
    target = parse_sentinel_url(url, sentinel_master)
    if target is None:
        return redis.Redis.from_url(url, **options)
    # Sentinels answer at once or are skipped: a dead one must not hold up finding the master.
    sentinel = MajoritySentinel(list(target.sentinels),
                                sentinel_kwargs={"socket_connect_timeout": 0.5, "socket_timeout": 1},
                                db=target.db, username=target.username, password=target.password, **options)
    return sentinel.master_for(target.master)


class MajoritySentinel(Sentinel):
    """redis-py's Sentinel client, trusting a master address only when most of the sentinels name it.

    redis-py takes the first answer. A sentinel that has not yet heard of a failover (they learn of it
    within a couple of seconds) still names the old master; if that machine is back by then, it is still
    a master until the sentinels turn it into a replica, and everything written to it is thrown away when
    it resynchronises: a job store must not be split like that.
    """

    def discover_master(self, service_name: str) -> tuple[str, int]:
        votes: collections.Counter[tuple[str, int]] = collections.Counter()
        for sentinel in self.sentinels:
            try:
                state = sentinel.sentinel_masters().get(service_name)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if state and self.check_master_state(state, service_name):
                votes[(state["ip"], state["port"])] += 1
        if votes:
            address, count = votes.most_common(1)[0]
            if count > len(self.sentinels) // 2:
                return address
        raise MasterNotFoundError(f"no master named {service_name!r} by a majority of the sentinels ({dict(votes)})")


def replicated(client: redis.Redis, job_ids: list[str], replicas: int, timeout_seconds: float) -> bool:
    """Whether the records of ``job_ids``, and every write the master took before this call (their
    Celery messages included), have reached ``replicas`` replicas, waiting up to ``timeout_seconds``.

    WAIT covers the writes of the connection that issues it, up to its last one; replication is one
    ordered stream, so a write made here after the messages were sent (on kombu's own connection)
    carries the messages with it. That write only marks records that exist: if a failover
    reconnected us to a master without them, the answer is no.
    """
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.eval(_MARK_SENT, 1, job_key(job_id))
        pipe.execute_command("WAIT", replicas, int(timeout_seconds * 1000))
        *present, acknowledged = pipe.execute()
    return all(present) and acknowledged >= replicas


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (the clients made here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value

"""bloomq's Redis clients on Sentinel: job store, broker and rate limits find the master through the
sentinels, and a submission's replica acknowledgement (WAIT) is checked."""

from __future__ import annotations

import pytest
import redis
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from config.settings import Settings
from jobs.celery_app import make_celery, send_generate
from jobs.connection import MajoritySentinel, connect
from jobs.keys import job_key
from jobs.schema import Job, JobRequest
from jobs.store import JobStore
from tests.support import SentinelCluster
from web import limiter_storage


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SentinelCluster(tmp_path_factory.mktemp("sentinel"), replicas=1, master_name="bloomq").start()
    yield cluster
    cluster.stop()


@pytest.fixture()
def settings(cluster):
    redis.Redis(port=cluster.master_port()).flushall()
    return Settings(redis_url=cluster.url, redis_sentinel_master="bloomq", redis_min_replicas=1)


def _job() -> Job:
    request = JobRequest.model_validate({"inputs": "hello"})
    return Job(id="00000000-0000-4000-8000-000000000001", model="tiny-bloom", inputs=request.inputs,
               parameters=request.parameters.normalised(8))


def test_store_broker_and_limiter_all_reach_the_master_named_by_the_sentinels(cluster, settings):
    master = redis.Redis(port=cluster.master_port())
    store = JobStore(connect(settings.redis_url, settings.redis_sentinel_master), 60)
    job = _job()
    store.create(job)
    send_generate(make_celery(settings), job.id, "bloomq.tiny-bloom")
    assert master.hexists(job_key(job.id), "doc") and master.llen("bloomq.tiny-bloom") == 1
    assert store.replicated([job.id], 1, 1.0)  # the record and the message reached the replica
    replica = redis.Redis(port=next(n.port for n in cluster.nodes if n.port != cluster.master_port()))
    assert replica.hexists(job_key(job.id), "doc") and replica.llen("bloomq.tiny-bloom") == 1

    uri, options = limiter_storage(settings)
    assert uri.startswith("redis+sentinel://") and uri.endswith("/bloomq")
    limiter = FixedWindowRateLimiter(storage_from_string(uri, **options))
    limit = RateLimitItemPerMinute(1)
    assert limiter.hit(limit, "who") and not limiter.hit(limit, "who")
    assert any(b"who" in key for key in master.keys("LIMITS*"))


def test_a_record_that_is_not_on_the_master_is_never_reported_replicated(settings):
    store = JobStore(connect(settings.redis_url, settings.redis_sentinel_master), 60)
    assert not store.replicated(["no-such-job"], 1, 0.2)


def test_without_enough_replicas_wait_times_out_and_says_no(settings):
    store = JobStore(connect(settings.redis_url, settings.redis_sentinel_master), 60)
    job = _job()
    store.create(job)
    assert store.replicated([job.id], 1, 0.5)
    assert not store.replicated([job.id], 2, 0.2)  # there is only one replica


class _FakeSentinel:
    def __init__(self, port: int | None) -> None:
        self.port = port

    def sentinel_masters(self):
        if self.port is None:
            raise redis.ConnectionError("down")
        return {"m": {"ip": "10.0.0.1", "port": self.port, "is_master": True, "is_sdown": False,
                      "is_odown": False, "num-other-sentinels": 2}}


def test_a_master_is_trusted_only_when_most_sentinels_name_it():
    sentinel = MajoritySentinel([])
    # One sentinel has not heard of the failover yet and names the old master: outvoted.
    sentinel.sentinels = [_FakeSentinel(6379), _FakeSentinel(6380), _FakeSentinel(6380)]
    assert sentinel.discover_master("m") == ("10.0.0.1", 6380)
    # Two of three disagree or are unreachable: no master rather than perhaps the wrong one.
    sentinel.sentinels = [_FakeSentinel(6379), _FakeSentinel(6380), _FakeSentinel(None)]
    with pytest.raises(redis.ConnectionError):
        sentinel.discover_master("m")

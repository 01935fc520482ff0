"""Redis behind Sentinel: the master is SIGKILLed under load, and a replica takes over."""

from tests.e2e.conftest import make_stack
from tests.failover import describe, run_failover

# Submissions wait for one replica's acknowledgement; the batch is small so jobs are running at the kill.
ENV = {"BLOOMQ_REDIS_MIN_REPLICAS": "1", "BLOOMQ_REDIS_REPLICA_WAIT_SECONDS": "0.5", "BLOOMQ_MAX_BATCH_SIZE": "8"}


def _assert_nothing_lost(report, jobs: int) -> None:
    assert report.errors == []  # every refusal was a 503 with Retry-After
    assert len(report.accepted) == jobs
    assert report.lost == []
    assert report.terminal == jobs and report.statuses["succeeded"] == jobs
    assert report.duplicated == []  # one final result each
    assert report.extra_jobs == []  # a key retried through the failover made one job
    assert report.refused > 0 and report.outages[0].first_accepted is not None  # it was refused, then served again


def test_master_killed_under_load_every_accepted_job_finishes_exactly_once(request, tmp_path_factory, slow_model_dir):
    # Two replicas: after the failover the new master still has one to acknowledge submissions.
    stack = make_stack(request, tmp_path_factory, slow_model_dir, replicas=2, **ENV)
    try:
        stack.start_web()
        stack.start_worker()
        report = run_failover(stack.url, stack.redis, [w.log_path for w in stack.workers], jobs=40)
        print(describe(report))
        _assert_nothing_lost(report, 40)
    finally:
        stack.stop()


def test_old_master_comes_back_as_a_replica_and_no_write_to_it_is_lost(request, tmp_path_factory, slow_model_dir):
    # One replica and an append-only file: the old master restarts with its data as it was at the kill;
    # the sentinels turn it into a replica of the new master, and it takes the new master's data. With no
    # replica left meanwhile, submissions are refused until it is back (nothing accepted unreplicated).
    stack = make_stack(request, tmp_path_factory, slow_model_dir, appendonly=True, replicas=1, **ENV)
    cluster = stack.redis
    try:
        old_master = cluster.node(cluster.master_port())
        stack.start_web()
        stack.start_worker()
        report = run_failover(stack.url, cluster, [w.log_path for w in stack.workers], jobs=30, rejoin=True)
        print(describe(report))
        _assert_nothing_lost(report, 30)
        assert cluster.role(old_master) == "slave" and cluster.master_port() != old_master.port
    finally:
        stack.stop()

"""A small chaos run in the test suite (bench/chaos.py runs N = 1000)."""

from tests.chaos import run_chaos
from tests.e2e.conftest import make_stack


def test_chaos_every_job_ends_once_despite_kills_and_a_redis_restart(request, tmp_path_factory, slow_model_dir):
    stack = make_stack(request, tmp_path_factory, slow_model_dir, appendonly=True, BLOOMQ_MAX_BATCH_SIZE="4")
    try:
        stack.start_web()
        stack.start_worker()
        report = run_chaos(stack.url, stack.redis, [w.log_path for w in stack.workers], jobs=24, kills=2,
                           redis_restarts=1, max_new_tokens=(20, 150), timeout=240)
        assert report.kills == 2 and report.redis_restarts == 1
        assert report.lost == []
        assert report.terminal == 24 and report.statuses["succeeded"] == 24
        assert report.duplicated == []
    finally:
        stack.stop()

"""What happens when a worker dies mid-job, or cannot load its model."""

from __future__ import annotations

import time

import redis
import requests

from tests.e2e.conftest import make_stack
from tests.support import wait_for, wait_for_job


def test_worker_killed_mid_job_the_job_still_succeeds_exactly_once(request, tmp_path_factory, slow_model_dir):
    # A visibility timeout longer than any job in this test, but short enough to keep the test quick.
    stack = make_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_VISIBILITY_TIMEOUT="15")
    try:
        stack.start_web()
        first = stack.start_worker()
        job = stack.submit("Once upon a time", parameters={"max_new_tokens": 600})
        wait_for(
            lambda: requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"] == "running",
            timeout=30,
            what="the job to start",
        )
        time.sleep(0.5)
        first.kill()  # SIGKILL, launcher and worker process alike
        assert requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"] == "running"

        stack.start_worker()
        done = wait_for_job(stack.url, job["id"], timeout=90)
        assert done["status"] == "succeeded"
        assert done["output"]["generated_tokens"] == 600
        assert done["attempts"] == 2  # started on the killed worker, finished on the new one

        # Exactly once: every message for the job (the reaper's requeue and, once the visibility timeout
        # passes, Redis's redelivery of the original) ends acknowledged, and only one worker ever
        # reported a result.
        client = redis.Redis.from_url(stack.redis.url)
        wait_for(lambda: client.llen("bloomq.slow-bloom") == 0 and client.hlen("unacked") == 0, timeout=60,
                 what="every message to be acknowledged")
        finished = [w.log().count(f"job {job['id']}: succeeded") for w in stack.workers]
        assert finished == [0, 1]
        assert requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json() == done
    finally:
        stack.stop()


def test_a_model_that_fails_to_load_stops_the_worker_and_jobs_stay_queued(request, tmp_path_factory):
    missing = tmp_path_factory.mktemp("empty") / "no-such-bloom"
    stack = make_stack(request, tmp_path_factory, missing)
    try:
        stack.start_web()
        job = stack.submit("Hello")
        worker = stack.start_worker(wait=False)
        wait_for(lambda: not worker.alive(), timeout=60, what="the worker to exit")
        assert worker.proc.returncode != 0
        log = worker.log()
        assert "no-such-bloom" in log and "BLOOMQ_MODEL" in log  # the original error, and what to do
        polled = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json()
        assert polled["status"] == "queued"
        assert redis.Redis.from_url(stack.redis.url).llen("bloomq.no-such-bloom") == 1
    finally:
        stack.stop()

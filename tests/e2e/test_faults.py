"""What happens when a worker dies mid-job, or cannot load its model."""

from __future__ import annotations

import time

import redis
import requests

from tests.e2e.conftest import make_stack
from tests.support import WebhookReceiver, wait_for, wait_for_job


def test_worker_killed_mid_job_the_job_still_succeeds_exactly_once_and_its_webhooks_are_all_delivered(
        request, tmp_path_factory, slow_model_dir):
    # A visibility timeout longer than any job in this test, but short enough to keep the test quick; a
    # webhook deadline of 2 s so a delivery claimed by the killed worker comes back within 8 s.
    stack = make_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_VISIBILITY_TIMEOUT="15",
                       BLOOMQ_WEBHOOK_SECRET="s", BLOOMQ_WEBHOOK_ALLOW="127.0.0.1/32",
                       BLOOMQ_WEBHOOK_TIMEOUT_SECONDS="2")
    with WebhookReceiver(status=503) as hook:  # down until the worker is dead: deliveries pile up
        try:
            stack.start_web()
            first = stack.start_worker()
            job = stack.submit("Once upon a time", parameters={"max_new_tokens": 300}, webhook=hook.url,
                               webhook_events=["started", "completed"])
            started = f"{job['id']}:started:1"
            wait_for(lambda: started in hook.event_ids(), timeout=30, what="a first, failed try of the started hook")
            assert requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"] == "running"
            first.kill()  # SIGKILL, launcher and worker process alike: its pending delivery is in Redis only
            hook.status = 204
            assert requests.get(f"{stack.url}/api/v1/jobs/{job['id']}", timeout=5).json()["status"] == "running"

            stack.start_worker()
            done = wait_for_job(stack.url, job["id"], timeout=90)
            assert done["status"] == "succeeded"
            assert done["output"]["generated_tokens"] == 300
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

            # At least once: the killed worker's pending delivery is made by the new one, under the same
            # event id; each event got through, and the outbox is empty.
            events = {started, f"{job['id']}:started:2", f"{job['id']}:completed"}
            wait_for(lambda: set(hook.event_ids(answered=204)) == events, timeout=60,
                     what="every webhook event delivered")
            assert set(hook.event_ids()) == events  # no other ids: a retry reuses its event's id
            wait_for(lambda: client.zcard("bloomq:webhooks:due") == 0, timeout=10, what="the outbox to empty")
            assert client.hlen("bloomq:webhooks:deliveries") == 0
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


def test_redis_restart_with_aof_loses_no_accepted_job(request, tmp_path_factory, slow_model_dir):
    stack = make_stack(request, tmp_path_factory, slow_model_dir, appendonly=True, BLOOMQ_MAX_BATCH_SIZE="2")
    try:
        stack.start_web()
        stack.start_worker()
        # Three rounds of two: some jobs still queued, some running, when Redis stops.
        ids = [stack.submit("Once upon a time", parameters={"max_new_tokens": 120})["id"] for _ in range(6)]
        wait_for(lambda: requests.get(f"{stack.url}/api/v1/jobs/{ids[0]}", timeout=5).json()["status"] == "running",
                 timeout=30, what="a job to run")
        stack.redis.stop()
        down = requests.post(f"{stack.url}/api/v1/jobs", json={"inputs": "x"}, timeout=30)
        assert down.status_code == 503 and down.json()["error"]["type"] == "unavailable"
        ready = requests.get(f"{stack.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["reasons"][0]["code"] == "redis_unavailable"
        time.sleep(2)
        stack.redis.start()
        wait_for(lambda: requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200, timeout=60,
                 what="the web to recover (its readiness is Redis answering)")
        for job_id in ids:
            done = wait_for_job(stack.url, job_id, timeout=180)
            assert done["status"] == "succeeded", done
        # A worker logs a result just after storing it: wait for the lines, then count them.
        def counts() -> list[int]:
            logs = "".join(w.log() for w in stack.workers)
            return [logs.count(f"job {job_id}: succeeded") for job_id in ids]

        wait_for(lambda: all(counts()), timeout=10, what="every result to be logged")
        assert counts() == [1] * len(ids)
    finally:
        stack.stop()


def test_poisoned_messages_are_rejected_not_retried_and_the_worker_serves_on(stack):
    client = redis.Redis.from_url(stack.redis.url)
    from celery import Celery

    app = Celery(broker=stack.redis.url)
    app.send_task("bloomq.generate", args=[{"not": "an id"}], queue="bloomq.tiny-bloom")
    app.send_task("bloomq.generate", args=[], queue="bloomq.tiny-bloom")
    client.lpush("bloomq.tiny-bloom", b"\\x00 this is not a message")
    wait_for(lambda: client.llen("bloomq.tiny-bloom") == 0 and client.hlen("unacked") == 0, timeout=30,
             what="the poisoned messages to be consumed and acknowledged")
    job = stack.submit("still serving", parameters={"max_new_tokens": 3})
    assert wait_for_job(stack.url, job["id"])["status"] == "succeeded"
    time.sleep(1)
    assert client.llen("bloomq.tiny-bloom") == 0 and client.hlen("unacked") == 0  # nothing came back
    log = stack.workers[0].log()
    assert "generate expects a job id string" in log

"""A request that cannot be served fails alone (real stack: redis-server, worker processes, gunicorn)."""

from __future__ import annotations

import json
import os
import signal
import time

import requests

from tests.e2e.conftest import make_reference, make_stack
from tests.faulty_worker import POISON
from tests.support import wait_for, wait_for_job

ORDINARY = ["Once upon a time", "从前有一座山", "كان يا ما كان", "def fibonacci(n):"]
ORDINARY_TOKENS = 300  # on the slow model: still running while every hostile request is sent

# (name, raw JSON body, what must happen): "4xx" refused at submit, naming the field when there is one;
# "runs" accepted (an odd but valid request) and ends succeeded, or failed with a clear error.
HOSTILE = [
    ("temperature rounding to 0 in float32", '{"inputs": "a", "parameters": {"do_sample": true, "temperature": 1e-45}}',
     "parameters.temperature"),
    ("top_k overflowing a long tensor", '{"inputs": "a", "parameters": {"top_k": 9223372036854775807}}',
     "parameters.top_k"),
    ("Infinity temperature", '{"inputs": "a", "parameters": {"temperature": Infinity}}', "parameters.temperature"),
    ("NaN top_p", '{"inputs": "a", "parameters": {"top_p": NaN}}', "parameters.top_p"),
    ("-Infinity penalty", '{"inputs": "a", "parameters": {"repetition_penalty": -Infinity}}',
     "parameters.repetition_penalty"),
    ("vanishing penalty", '{"inputs": "a", "parameters": {"repetition_penalty": 1e-300}}',
     "parameters.repetition_penalty"),
    ("huge penalty", '{"inputs": "a", "parameters": {"repetition_penalty": 1e300}}', "parameters.repetition_penalty"),
    ("vanishing top_p", '{"inputs": "a", "parameters": {"top_p": 1e-300}}', "parameters.top_p"),
    ("seed past 64 bits", '{"inputs": "a", "parameters": {"do_sample": true, "seed": 18446744073709551616}}',
     "parameters.seed"),
    ("zero new tokens", '{"inputs": "a", "parameters": {"max_new_tokens": 0}}', "parameters.max_new_tokens"),
    ("astronomical new tokens", '{"inputs": "a", "parameters": {"max_new_tokens": 1000000000000000000000}}',
     "parameters.max_new_tokens"),
    ("stop string too long", json.dumps({"inputs": "a", "parameters": {"stop": ["x" * 257]}}), "parameters.stop.0"),
    ("too many stop strings", json.dumps({"inputs": "a", "parameters": {"stop": list("abcde")}}), "parameters.stop"),
    ("timeout Infinity", '{"inputs": "a", "timeout": Infinity}', "timeout"),
    ("parameters not an object", '{"inputs": "a", "parameters": "greedy"}', "parameters"),
    ("nested thousands deep", '{"inputs": "a", "parameters": ' + "[" * 5000 + "]" * 5000 + "}", "400"),
    ("smallest typical_p", '{"inputs": "a", "parameters": {"do_sample": true, "typical_p": 1e-6, "max_new_tokens": 20}}',
     "runs"),
    ("largest seed", '{"inputs": "a", "parameters": {"do_sample": true, "seed": 9223372036854775807, "max_new_tokens": 20}}',
     "runs"),
    ("coldest sampling, strongest penalty",
     '{"inputs": "a", "parameters": {"do_sample": true, "temperature": 1e-4, "repetition_penalty": 100, '
     '"max_new_tokens": 20}}', "runs"),
    ("hottest sampling, top_k over the vocabulary",
     '{"inputs": "a", "parameters": {"temperature": 100, "top_k": 250880, "max_new_tokens": 20}}', "runs"),
    ("odd stop strings", json.dumps({"inputs": "a", "parameters": {"stop": ["\u0000", "😀", "\n", " "],
                                                                    "max_new_tokens": 20}}), "runs"),
]


def _running(stack, job_ids):
    jobs = [requests.get(f"{stack.url}/api/v1/jobs/{i}", timeout=10).json() for i in job_ids]
    return all(j["status"] == "running" and (j["output"] or {}).get("generated_tokens", 0) > 0 for j in jobs)


def test_hostile_requests_fail_alone_while_ordinary_jobs_finish_unchanged(slow_stack, slow_model_dir):
    reference = make_reference(slow_model_dir)
    stack = slow_stack
    ordinary = [stack.submit(p, parameters={"max_new_tokens": ORDINARY_TOKENS, "details": True})["id"]
                for p in ORDINARY]
    wait_for(lambda: _running(stack, ordinary), timeout=60, what="the ordinary jobs to run")
    accepted = []
    for name, body, expected in HOSTILE:
        response = requests.post(f"{stack.url}/api/v1/jobs", data=body,
                                 headers={"Content-Type": "application/json"}, timeout=10)
        if expected == "runs":
            assert response.status_code == 202, (name, response.text)
            accepted.append((name, response.json()["id"]))
        elif expected == "400":
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"]["message"], name
        else:
            assert response.status_code == 422, (name, response.text)
            assert expected in [f["name"] for f in response.json()["error"]["fields"]], (name, response.text)
    assert _running(stack, ordinary)  # the hostile requests really arrived while the ordinary jobs ran
    for name, job_id in accepted:
        done = wait_for_job(stack.url, job_id, timeout=120)
        assert done["status"] in ("succeeded", "failed"), name
        if done["status"] == "failed":
            assert done["error"]["type"] and done["error"]["message"], name
    for prompt, job_id in zip(ORDINARY, ordinary, strict=True):
        done = wait_for_job(stack.url, job_id, timeout=120)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
        assert done["output"]["generated_tokens"] == ORDINARY_TOKENS
        reference.check_greedy(prompt, done["output"])
    after = wait_for_job(stack.url, stack.submit("still serving", parameters={"max_new_tokens": 5})["id"])
    assert after["status"] == "succeeded"


TOKENS_OVER_THE_PAUSE = 250


def test_a_redis_pause_longer_than_the_heartbeat_lifetime_costs_no_work(request, tmp_path_factory, slow_model_dir):
    # Two workers, so each one's recovery thread could mistake the other for dead after the pause.
    stack = make_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_MAX_BATCH_SIZE="2")
    try:
        stack.start_web()
        stack.start_worker(wait=False)
        stack.start_worker(wait=False)
        stack.wait_for_workers()
        # Long enough to be running when Redis stops; whether they end during the pause or after, they end once.
        jobs = [stack.submit(p, parameters={"max_new_tokens": TOKENS_OVER_THE_PAUSE})["id"] for p in ORDINARY]
        wait_for(lambda: _running(stack, jobs), timeout=60, what="all four jobs to run")
        heartbeat_lifetime = 3 * 1.0  # the tests run workers with BLOOMQ_HEARTBEAT_SECONDS=1
        os.kill(stack.redis.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(2 * heartbeat_lifetime)
        finally:
            os.kill(stack.redis.proc.pid, signal.SIGCONT)
        for job_id in jobs:
            done = wait_for_job(stack.url, job_id, timeout=180)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 1, done  # never requeued: nobody mistook a live worker for dead
            assert done["output"]["generated_tokens"] == TOKENS_OVER_THE_PAUSE
        logs = "".join(w.log() for w in stack.workers)
        assert "requeueing" not in logs and "was dropped" not in logs
    finally:
        stack.stop()


def test_a_fatal_device_error_restarts_the_worker_and_a_job_that_causes_it_twice_is_poison(
    request, tmp_path_factory, tiny_model_dir, reference
):
    stack = make_stack(request, tmp_path_factory, tiny_model_dir)
    try:
        stack.start_web()
        worker = stack.start_worker(command=("-m", "tests.faulty_worker"))
        ordinary = [stack.submit(p, parameters={"max_new_tokens": 200, "details": True})["id"] for p in ORDINARY]
        poison = stack.submit(f"{POISON} pass it on", parameters={"max_new_tokens": 200})["id"]
        failed = wait_for_job(stack.url, poison, timeout=180)
        assert failed["status"] == "failed" and failed["error"]["type"] == "poison_job", failed
        assert "device-side assert" in failed["error"]["message"]
        assert failed["device_faults"] == 2
        for prompt, job_id in zip(ORDINARY, ordinary, strict=True):
            done = wait_for_job(stack.url, job_id, timeout=180)
            assert done["status"] == "succeeded", done
            reference.check_greedy(prompt, done["output"])
            assert done["device_faults"] <= 1  # at most the one fault it shared with the poison job
        # The second process stores the poison verdict before it exits, so the launcher's line can come later.
        def deaths() -> int:
            return worker.log().count("died with status 70")

        wait_for(lambda: deaths() >= 2, timeout=30, what="the launcher to see the second exit")
        assert deaths() == 2  # the launcher restarted the process each time, and only then
        wait_for(lambda: stack.workers and worker.alive() and _live(stack), timeout=60, what="the worker back")
        after = wait_for_job(stack.url, stack.submit("still serving", parameters={"max_new_tokens": 5})["id"], 120)
        assert after["status"] == "succeeded"
    finally:
        stack.stop()


def _live(stack) -> bool:
    return any(m["workers"] for m in requests.get(f"{stack.url}/api/v1/models", timeout=5).json()["models"])

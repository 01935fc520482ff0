"""Routing between models, supervision of worker processes, fast recovery and draining."""

from __future__ import annotations

import os
import signal
import time

import requests

from tests.e2e.conftest import make_stack
from tests.support import live_workers, wait_for, wait_for_job


def _job(stack, job_id, headers=None):
    return requests.get(f"{stack.url}/api/v1/jobs/{job_id}", headers=headers or stack.headers, timeout=10).json()


def _workers(stack):
    return requests.get(f"{stack.url}/api/v1/workers", headers=stack.headers, timeout=10).json()["workers"]


def test_jobs_route_to_their_models_workers(request, tmp_path_factory, tiny_model_dir, slow_model_dir):
    stack = make_stack(request, tmp_path_factory, tiny_model_dir, BLOOMQ_MODELS=str(slow_model_dir))
    try:
        stack.start_web()
        stack.start_worker(wait=False)
        stack.start_worker(wait=False, model=str(slow_model_dir))
        stack.wait_for_workers()
        models = {m["name"]: m for m in requests.get(f"{stack.url}/api/v1/models", timeout=5).json()["models"]}
        assert models["tiny-bloom"]["workers"] == 1 and models["slow-bloom"]["workers"] == 1
        jobs = [(stack.submit("Hello", model=m, parameters={"max_new_tokens": 5}), m)
                for m in ("tiny-bloom", "slow-bloom") * 3]
        for job, model in jobs:
            done = wait_for_job(stack.url, job["id"])
            assert done["status"] == "succeeded" and done["model"] == model
            assert done["worker"].startswith(f"{model}@")  # only that model's workers took it
        queued = stack.submit("Hello", model="bloom-7b1")  # a known model nobody serves yet
        assert queued["status"] == "queued" and "no worker" in queued["warnings"][0]
        unknown = requests.post(f"{stack.url}/api/v1/jobs", json={"inputs": "x", "model": "gpt-9"}, timeout=5)
        assert unknown.status_code == 422 and unknown.json()["error"]["fields"][0]["name"] == "model"
        info = {w["model"]: w for w in _workers(stack)}
        assert info["slow-bloom"]["batch_capacity"] >= 1 and info["slow-bloom"]["devices"] == []
        assert info["tiny-bloom"]["instance"].startswith(info["tiny-bloom"]["name"] + ":")
    finally:
        stack.stop()


def _start_long_job(stack, max_new_tokens):
    """The web, a supervised worker, and one job it is running: (launcher, job)."""
    stack.start_web()
    launcher = stack.start_worker()
    job = stack.submit("Once upon a time", parameters={"max_new_tokens": max_new_tokens})
    wait_for(lambda: _job(stack, job["id"])["status"] == "running", timeout=30, what="the job to start")
    return launcher, job


def test_a_killed_worker_process_is_restarted_and_its_job_requeued_quickly_and_counted_once(
        request, tmp_path_factory, slow_model_dir):
    # Celery's own redelivery would take the default visibility timeout (hours): recovery here is the
    # launcher restarting the process and the reaper requeueing the orphaned jobs. The jobs are a quota'd
    # key's: its two active slots are taken while they run, and each is counted once in its usage.
    stack = make_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_OPERATOR_KEYS="operator-key-1")
    try:
        stack.start_web()
        launcher = stack.start_worker()
        made = requests.post(f"{stack.url}/api/v1/keys", json={"name": "team", "max_active_jobs": 2},
                             headers=stack.headers, timeout=10).json()
        key = {"Authorization": f"Bearer {made['secret']}"}
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 300}}
        jobs = [requests.post(f"{stack.url}/api/v1/jobs", json=body, headers=key, timeout=10).json()["id"]
                for _ in range(2)]
        third = requests.post(f"{stack.url}/api/v1/jobs", json=body, headers=key, timeout=10)
        assert third.status_code == 429 and third.json()["error"]["limit"] == "max_active_jobs"
        wait_for(lambda: all(_job(stack, job_id, key)["status"] == "running" for job_id in jobs), timeout=30,
                 what="the jobs to start")
        (worker,) = _workers(stack)
        os.kill(worker["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: any(w["pid"] != worker["pid"] for w in _workers(stack)), timeout=60,
                 what="the launcher to restart the worker")
        (restarted,) = _workers(stack)
        assert (worker["restarts"], restarted["restarts"]) == (0, 1)  # as the dashboard shows it
        wait_for(lambda: all(_job(stack, job_id, key)["attempts"] == 2 for job_id in jobs), timeout=60,
                 what="both jobs to start again")
        assert time.monotonic() - killed_at < 60  # requeued and started again within a minute
        done = [wait_for_job(stack.url, job_id, timeout=120, headers=key) for job_id in jobs]
        assert all(job["status"] == "succeeded" and job["attempts"] == 2 for job in done)
        assert launcher.alive()
        # A worker logs a result just after storing it: wait for the lines, then count them.
        wait_for(lambda: all(f"job {job_id}: succeeded" in launcher.log() for job_id in jobs), timeout=10,
                 what="both results to be logged")
        log = launcher.log()
        assert "restarting in" in log and all(log.count(f"job {job_id}: succeeded") == 1 for job_id in jobs)
        usage = requests.get(f"{stack.url}/api/v1/usage", headers=key, timeout=10).json()["totals"]
        assert usage == {"prompt_tokens": sum(job["output"]["prompt_tokens"] for job in done),
                         "completion_tokens": 600, "jobs": 2}
        short = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        assert requests.post(f"{stack.url}/api/v1/jobs", json=short, headers=key, timeout=10).status_code == 202
    finally:
        stack.stop()


def test_sigterm_drains_the_launcher_after_its_running_job(request, tmp_path_factory, slow_model_dir):
    stack = make_stack(request, tmp_path_factory, slow_model_dir)
    try:
        launcher, job = _start_long_job(stack, 300)
        os.kill(launcher.pid, signal.SIGTERM)
        assert launcher.proc.wait(timeout=90) == 0
        done = _job(stack, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1  # finished, not abandoned
        assert live_workers(stack.url) == 0  # withdrew its announcement
    finally:
        stack.stop()

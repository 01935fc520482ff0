"""`make run`'s stack script: starts Redis when none answers, a worker and the web; Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis
import requests

from tests.conftest import ARTIFACTS
from tests.support import ROOT, free_port, live_workers, service_env, wait_for, wait_for_job
from worker.model.precision import cpu_dtype


def test_stack_serves_jobs_and_ctrl_c_stops_everything_it_started(tiny_model_dir):
    redis_port, web_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = service_env(redis_url, str(tiny_model_dir), BLOOMQ_PORT=str(web_port), BLOOMQ_DTYPE="auto")  # make run's
    log_path = ARTIFACTS / "logs" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "scripts/stack.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
    base = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: live_workers(base) >= 1, timeout=90, what="the stack to come up")
        assert redis.Redis.from_url(redis_url).ping()  # the script started its own redis-server
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5}}
        job = requests.post(f"{base}/api/v1/jobs", json=body, timeout=5).json()
        assert wait_for_job(base, job["id"])["status"] == "succeeded"
        # The default dtype is what this machine's CPU flags call for (bf16 with native bf16 instructions).
        expected = cpu_dtype("auto")
        (worker,) = requests.get(f"{base}/api/v1/workers", timeout=5).json()["workers"]
        assert (worker["dtype"], worker["dtype_reason"]) == (expected.name, expected.reason)

        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0
        assert _started_by_it(redis_url) == [], "a process outlived the stack"
        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=0.5).ping()
            raise AssertionError("redis-server outlived the stack")
        except redis.ConnectionError:
            pass
        try:
            requests.get(f"{base}/healthz", timeout=1)
            raise AssertionError("the web outlived the stack")
        except requests.ConnectionError:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _started_by_it(redis_url):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _started_by_it(redis_url: str) -> list[int]:
    """The processes running with this stack's Redis URL in their environment (the checkpoint is shared
    with other tests' stacks, so its path does not tell them apart)."""
    mark = f"BLOOMQ_REDIS_URL={redis_url}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found

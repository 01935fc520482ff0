"""A tensor-parallel worker group as `make run` starts it (BLOOMQ_TENSOR_PARALLEL=2: two CPU ranks with
gloo): jobs through Celery give the whole model's greedy text, the group announces itself once, and a rank
SIGKILLed while jobs run takes its group down, the launcher restarts the group, and every job succeeds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import requests

from tests.e2e.conftest import make_reference, make_stack
from tests.support import wait_for, wait_for_job

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog and", "def fibonacci(n):"]
LONG = 100  # tokens: the jobs still running when a rank is killed


def _ranks(launcher_pid: int) -> dict[int, int]:
    """The launcher's worker processes by rank (from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_a_group_of_two_serves_the_whole_models_text_and_survives_a_lost_rank(request, tmp_path_factory,
                                                                               slow_model_dir):
    reference = make_reference(slow_model_dir)
    stack = make_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_TENSOR_PARALLEL="2",
                       BLOOMQ_GROUP_TIMEOUT="20")
    try:
        stack.start_web()
        launcher = stack.start_worker()
        [worker] = requests.get(f"{stack.url}/api/v1/workers", timeout=5).json()["workers"]
        assert worker["tensor_parallel"] == 2
        assert len(worker["weights_bytes"]) == 2 and len(worker["load_peak_bytes"]) == 2
        # Each rank holds about half the weights (the LayerNorms and the first rank's biases are extra).
        half = sum(worker["weights_bytes"]) / 2
        assert all(0.9 * half < part < 1.1 * half for part in worker["weights_bytes"])

        jobs = [stack.submit(p, parameters={"max_new_tokens": 24, "details": True})["id"] for p in PROMPTS]
        for prompt, job_id in zip(PROMPTS, jobs, strict=True):
            done = wait_for_job(stack.url, job_id, timeout=120)
            assert done["status"] == "succeeded", done
            reference.check_greedy(prompt, done["output"])
            assert done["output"]["generated_text"] == reference(prompt, max_new_tokens=24,
                                                                  min_new_tokens=done["output"]["generated_tokens"])

        long_jobs = [stack.submit(p, parameters={"max_new_tokens": LONG, "details": True})["id"] for p in PROMPTS]
        wait_for(lambda: all(requests.get(f"{stack.url}/api/v1/jobs/{j}", timeout=5).json()["status"] == "running"
                             for j in long_jobs), timeout=60, what="the long jobs to run")
        ranks = _ranks(launcher.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)

        for prompt, job_id in zip(PROMPTS, long_jobs, strict=True):
            done = wait_for_job(stack.url, job_id, timeout=240)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 2 and done["output"]["generated_tokens"] == LONG
            reference.check_greedy(prompt, done["output"])
        assert "a rank of the group died" in launcher.log()
        restarted = _ranks(launcher.pid)
        assert sorted(restarted) == [0, 1] and restarted[0] != ranks[0]  # the whole group was restarted
    finally:
        stack.stop()

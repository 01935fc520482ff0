"""The chaos run shared by the test suite (small N) and ``bench/chaos.py`` (N = 1000): submit N jobs,
SIGKILL the worker process several times at random moments and restart Redis once, then check that
every job reached a final state, none was lost, and none got two final results."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support import RedisServer

FINAL_LINE = re.compile(r"job ([0-9a-f-]{36}): (succeeded|failed|canceled),")
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class ChaosReport:
    jobs: int
    seconds: float = 0.0
    kills: int = 0
    redis_restarts: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    max_attempts: int = 0

    @property
    def terminal(self) -> int:
        return sum(self.statuses[s] for s in TERMINAL)


def _get(session: requests.Session, url: str) -> dict | None:
    try:
        response = session.get(url, timeout=10)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def _worker_pids(base: str) -> list[int]:
    body = _get(requests.Session(), f"{base}/api/v1/workers")
    return [w["pid"] for w in body["workers"]] if body else []


def run_chaos(
    base: str,
    redis: RedisServer,
    worker_logs: list[Path],
    jobs: int,
    kills: int,
    redis_restarts: int = 1,
    max_new_tokens: tuple[int, int] = (8, 64),
    seed: int = 7,
    timeout: float = 600,
) -> ChaosReport:
    """Run the scenario against a running stack (web at ``base``, a supervised worker launcher)."""
    rng = random.Random(seed)
    report = ChaosReport(jobs=jobs)
    started = time.monotonic()

    def submit(i: int) -> str:
        body = {"inputs": f"Chaos job {i}: once upon a time", "parameters": {"max_new_tokens": rng.randint(*max_new_tokens)}}
        while True:
            try:
                response = requests.post(f"{base}/api/v1/jobs", json=body, timeout=30)
            except requests.RequestException:
                time.sleep(0.5)
                continue
            if response.status_code == 202:
                return response.json()["id"]
            time.sleep(0.5)  # 503 while Redis restarts: a client retries

    stop_chaos = threading.Event()

    def chaos() -> None:
        events = ["kill"] * kills + ["redis"] * redis_restarts
        rng.shuffle(events)
        for event in events:
            if stop_chaos.wait(rng.uniform(1.0, 4.0)):
                return
            if event == "kill":
                # Wait for a worker to be up again (the launcher restarts a killed one after a backoff).
                deadline = time.monotonic() + 60
                pids = _worker_pids(base)
                while not pids and time.monotonic() < deadline and not stop_chaos.is_set():
                    time.sleep(0.5)
                    pids = _worker_pids(base)
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        report.kills += 1
            else:
                redis.restart(down_seconds=1.0)
                report.redis_restarts += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(submit, range(jobs)))
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()

    session = requests.Session()
    pending = set(ids)
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    # Every chaos event happens while jobs are still pending (the events stop once all are done).
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            job = _get(session, f"{base}/api/v1/jobs/{job_id}")
            if job is not None and job["status"] in TERMINAL:
                final[job_id] = job
                pending.discard(job_id)
        time.sleep(0.5)
    stop_chaos.set()
    chaos_thread.join()
    report.seconds = time.monotonic() - started
    report.lost = sorted(pending)
    for job in final.values():
        report.statuses[job["status"]] += 1
        report.max_attempts = max(report.max_attempts, job["attempts"])
    finals = collections.Counter()
    for log in worker_logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        finals.update(m.group(1) for m in FINAL_LINE.finditer(text))
    report.duplicated = sorted(job_id for job_id in ids if finals[job_id] > 1)
    return report

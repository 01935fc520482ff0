"""The failover run shared by the test suite and ``bench/failover.py``: a steady stream of submissions (each
under its own Idempotency-Key, retried until accepted, as a careful client does) against a stack on a
Sentinel-managed Redis, while the master is SIGKILLed; then check that every accepted job reached a final
state exactly once, that each key made exactly one job, and measure how long submissions were refused."""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from jobs.connection import connect
from jobs.keys import JOB_KEY_PREFIX, job_stream_key
from tests.chaos import FINAL_LINE, TERMINAL, _get
from tests.support import SentinelCluster

RETRY_SECONDS = 0.1  # a client retries sooner than Retry-After (1 s), so the outage is measured finely


@dataclass
class Outage:
    killed_at: float
    first_refused: float | None = None  # first 503 (or connection error) after the kill
    first_accepted: float | None = None  # first 202 after that

    @property
    def window(self) -> float | None:
        """Seconds without service: first refusal to first acceptance (None when nothing was refused)."""
        if self.first_refused is None or self.first_accepted is None:
            return None
        return self.first_accepted - self.first_refused

    @property
    def from_kill(self) -> float | None:
        return None if self.first_accepted is None else self.first_accepted - self.killed_at


@dataclass
class FailoverReport:
    jobs: int
    seconds: float = 0.0
    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> the job id the client got
    refused: int = 0  # 503 answers and connection errors, retried
    errors: list[str] = field(default_factory=list)  # answers that were neither accepted nor a 503 + Retry-After
    outages: list[Outage] = field(default_factory=list)
    submit_seconds: list[float] = field(default_factory=list)  # latency of each accepting answer
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)  # accepted, but missing or not final at the end
    extra_jobs: list[str] = field(default_factory=list)  # keys that made more than one job record
    duplicated: list[str] = field(default_factory=list)  # jobs with two final results (logs or done events)
    max_attempts: int = 0

    @property
    def terminal(self) -> int:
        return sum(self.statuses[s] for s in TERMINAL)


def run_failover(
    base: str,
    cluster: SentinelCluster,
    worker_logs: list[Path],
    jobs: int,
    failovers: int = 1,
    rejoin: bool = False,
    rate: float = 10.0,
    max_new_tokens: tuple[int, int] = (20, 120),
    timeout: float = 120,
) -> FailoverReport:
    """Submit ``jobs`` jobs at ``rate`` a second and SIGKILL the master ``failovers`` times, spread over
    the run; with ``rejoin`` the killed node is started again once the sentinels have failed over (it
    must come back as a replica, its old data discarded)."""
    report = FailoverReport(jobs=jobs)
    lock = threading.Lock()
    events: list[tuple[float, bool]] = []  # (when an answer came, accepted?)
    started = time.monotonic()

    def submit(i: int) -> None:
        key = f"failover-{i}"
        body = {"inputs": f"{key}: once upon a time",
                "parameters": {"max_new_tokens": max_new_tokens[0] + i % (max_new_tokens[1] - max_new_tokens[0] + 1)}}
        while True:
            sent = time.monotonic()
            try:
                response = requests.post(f"{base}/api/v1/jobs", json=body, headers={"Idempotency-Key": key},
                                         timeout=30)
                ok = response.status_code in (200, 202)
                if not ok and (response.status_code != 503 or "Retry-After" not in response.headers):
                    report.errors.append(f"{response.status_code} {response.text[:200]}")
            except requests.RequestException as exc:
                ok = False
                report.errors.append(repr(exc))
            now = time.monotonic()
            with lock:
                events.append((now, ok))
                if ok:
                    report.accepted[key] = response.json()["id"]
                    report.submit_seconds.append(now - sent)
                else:
                    report.refused += 1
            if ok:  # 202, or 200: an earlier try made the job (its answer was lost or refused)
                break
            time.sleep(RETRY_SECONDS)

    def chaos() -> None:
        for n in range(failovers):
            # Kill when a share of the jobs is accepted, so jobs are queued and running at the moment.
            while len(report.accepted) < jobs * (n + 1) // (failovers + 1):
                time.sleep(0.05)
            old = cluster.master_port()
            assert old is not None
            cluster.node(old).kill()
            report.outages.append(Outage(killed_at=time.monotonic()))
            cluster.wait_for_failover(old)
            if rejoin:
                cluster.node(old).start()

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    threads: list[threading.Thread] = []
    for i in range(jobs):
        thread = threading.Thread(target=submit, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(1 / rate)
    for thread in threads:
        thread.join(timeout=timeout)
    chaos_thread.join(timeout=timeout)

    for outage in report.outages:
        refusals = [t for t, ok in events if not ok and t >= outage.killed_at]
        outage.first_refused = min(refusals, default=None)
        after = outage.first_refused if outage.first_refused is not None else outage.killed_at
        outage.first_accepted = min((t for t, ok in events if ok and t > after), default=None)

    _await_final(base, report, time.monotonic() + timeout)
    report.seconds = time.monotonic() - started
    _check_records(cluster, report)
    finals = collections.Counter()
    for log in worker_logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        finals.update(m.group(1) for m in FINAL_LINE.finditer(text))
    report.duplicated += [job_id for job_id in report.accepted.values() if finals[job_id] > 1]
    return report


def _await_final(base: str, report: FailoverReport, deadline: float) -> None:
    session = requests.Session()
    pending = set(report.accepted.values())
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            job = _get(session, f"{base}/api/v1/jobs/{job_id}")
            if job is not None and job["status"] in TERMINAL:
                report.statuses[job["status"]] += 1
                report.max_attempts = max(report.max_attempts, job["attempts"])
                pending.discard(job_id)
        time.sleep(0.3)
    report.lost = sorted(pending)


def _check_records(cluster: SentinelCluster, report: FailoverReport) -> None:
    """Read the master: one job record per key, and one ``done`` event per job."""
    client = connect(cluster.url, cluster.master_name)
    made = collections.Counter()
    for key in client.scan_iter(match=f"{JOB_KEY_PREFIX}*", count=500):
        doc = client.hget(key, "doc")
        if doc is not None:
            made[json.loads(doc)["inputs"].split(":", 1)[0]] += 1
    report.extra_jobs = sorted(key for key, count in made.items() if count > 1)
    for job_id in report.accepted.values():
        done = [entry for _id, entry in client.xrange(job_stream_key(job_id)) if entry[b"event"] == b"done"]
        if len(done) > 1:
            report.duplicated.append(job_id)
    client.close()


def describe(report: FailoverReport) -> str:
    """One line a test prints: what the run measured."""
    windows = ", ".join("none refused" if o.window is None else f"{o.window:.2f} s" for o in report.outages)
    from_kill = ", ".join("-" if o.from_kill is None else f"{o.from_kill:.2f} s" for o in report.outages)
    latencies = sorted(report.submit_seconds)
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return (f"failover: {len(report.accepted)} jobs accepted, {report.refused} refusals retried; "
            f"without service (first 503 to first 202): {windows}; kill to first 202: {from_kill}; "
            f"submit p50 {p50:.1f} ms; {report.terminal} final, {len(report.lost)} lost, "
            f"{len(report.duplicated)} with two final results, max attempts {report.max_attempts}; "
            f"{report.seconds:.0f} s")

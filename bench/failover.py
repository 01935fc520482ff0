"""Redis failover at scale: N jobs while the Sentinel-managed master is SIGKILLed twice, and what replica
acknowledgement (``BLOOMQ_REDIS_MIN_REPLICAS=1``, Redis WAIT) costs a submission.

    make bench-failover        # or: python bench/failover.py [--jobs 1000] [--failovers 2] [--latency-jobs 300]

A master, two replicas and three sentinels (``redis-server --sentinel``) on free ports, append-only files
on; each killed master is started again once the sentinels have failed over, and rejoins as a replica.
Uses the tiny random BLOOM of ``bench/chaos.py``. Prints tables and appends them, with the command, date
and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import chaos_model, fresh_logs, machine, web_up  # noqa: E402
from jobs.connection import connect  # noqa: E402
from tests.failover import describe, run_failover  # noqa: E402
from tests.support import SentinelCluster, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402

LOGS = ROOT / "test-artifacts" / "failover"
ENV = {"BLOOMQ_LOG_LEVEL": "INFO", "BLOOMQ_MAX_BATCH_SIZE": "16", "BLOOMQ_REDIS_REPLICA_WAIT_SECONDS": "0.5"}


def submit_latency(base: str, jobs: int) -> list[float]:
    """Seconds each of ``jobs`` sequential submissions took, over one kept-alive connection."""
    session = requests.Session()
    seconds = []
    for i in range(jobs):
        started = time.perf_counter()
        response = session.post(f"{base}/api/v1/jobs", json={"inputs": f"latency {i}",
                                                             "parameters": {"max_new_tokens": 1}}, timeout=10)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 202, response.text
    return seconds


def latency_row(replicas: int, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[int(len(ms) * 0.95)]
    return f"| {replicas} | {len(ms)} | {statistics.mean(ms):.2f} | {ms[len(ms) // 2]:.2f} | {p95:.2f} | {ms[-1]:.2f} |"


def measure_latency(cluster: SentinelCluster, model: Path, jobs: int) -> list[str]:
    """Submit latency with WAIT off (0) and on (1), the same web and Redis otherwise; no worker runs, so
    the model's CPU use does not blur the figures."""
    rows = []
    for replicas in (0, 1, 0, 1):  # twice each, interleaved, against drift
        port = free_port()
        web = start_web(cluster.url, str(model), LOGS / f"latency-web-{replicas}.log", port,
                        **{**ENV, "BLOOMQ_LOG_LEVEL": "WARNING", "BLOOMQ_REDIS_MIN_REPLICAS": str(replicas)})
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: web_up(base), timeout=30, what="the web")
            submit_latency(base, 20)  # warm up both gunicorn processes
            rows.append(latency_row(replicas, submit_latency(base, jobs)))
        finally:
            web.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--failovers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0, help="submissions started per second")
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    model = chaos_model()
    fresh_logs(LOGS)
    cluster = SentinelCluster(Path(tempfile.mkdtemp(prefix="bloomq-failover-")), replicas=2, appendonly=True).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**ENV, "BLOOMQ_REDIS_MIN_REPLICAS": "1"}
    web = worker = None
    try:
        latency = measure_latency(cluster, model, args.latency_jobs)
        connect(cluster.url).flushdb()  # the latency runs' jobs are not part of the failover run
        web = start_web(cluster.url, str(model), LOGS / "web.log", port, **env)
        worker = start_worker(cluster.url, str(model), LOGS / "worker.log", **env)
        wait_for(lambda: live_workers(base) >= 1, timeout=120, what="the worker")
        report = run_failover(base, cluster, [worker.log_path], jobs=args.jobs, failovers=args.failovers,
                              rejoin=True, rate=args.rate, max_new_tokens=(16, 128), timeout=1800)
    finally:
        for proc in (worker, web):
            if proc is not None:
                proc.stop()
        cluster.stop()
    print(describe(report))
    windows = ", ".join("—" if o.window is None else f"{o.window:.2f}" for o in report.outages)
    from_kill = ", ".join("—" if o.from_kill is None else f"{o.from_kill:.2f}" for o in report.outages)
    table = "\n".join([
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `python bench/failover.py --jobs {args.jobs} "
        f"--failovers {args.failovers} --rate {args.rate:g} --latency-jobs {args.latency_jobs}`",
        "",
        f"Machine: {machine()}. Redis {redis_version()}: a master, two replicas and three sentinels on one machine "
        "(`down-after-milliseconds 1000`, quorum 2), append-only files on; `BLOOMQ_REDIS_MIN_REPLICAS=1`, "
        "`BLOOMQ_REDIS_REPLICA_WAIT_SECONDS=0.5`. Model: tiny random BLOOM (hidden 256, 4 layers), batch up to 16, "
        "max_new_tokens 16..128. Each client retries a refused submission every 0.1 s with its Idempotency-Key; "
        "each killed master is restarted once the sentinels have failed over and rejoins as a replica.",
        "",
        "| jobs | accepted | terminal | succeeded | lost | two final results | keys with two jobs | master SIGKILLs | "
        "refusals retried | without service s (first 503 → first 202) | kill → first 202 s | max attempts | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
        f"| {report.jobs} | {len(report.accepted)} | {report.terminal} | {report.statuses['succeeded']} | "
        f"{len(report.lost)} | {len(report.duplicated)} | {len(report.extra_jobs)} | {len(report.outages)} | "
        f"{report.refused} | {windows} | {from_kill} | {report.max_attempts} | {report.seconds:.0f} |",
        "",
        f"Submit latency, one client, {args.latency_jobs} sequential `POST /api/v1/jobs` over HTTP (keep-alive), "
        "same stack without a worker, two rounds each, interleaved (ms):",
        "",
        "| replicas acknowledging (`BLOOMQ_REDIS_MIN_REPLICAS`) | submissions | mean | p50 | p95 | max |",
        "|---:|---:|---:|---:|---:|---:|",
        *latency,
        "",
    ])
    print(table)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write("\n" + table)
    ok = (not report.lost and not report.duplicated and not report.extra_jobs and not report.errors
          and report.terminal == len(report.accepted) == report.jobs)
    return 0 if ok else 1


def redis_version() -> str:
    import subprocess

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((part.split("=", 1)[1] for part in out.split() if part.startswith("v=")), "?")


if __name__ == "__main__":
    # A SIGTERM ends the run through the normal exit path, so the processes it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

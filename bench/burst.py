"""Burst intake benchmark: N jobs submitted at the same instant, through the real stack.

    make bench-burst      # or: python bench/burst.py [--bursts 16,64] [--wait-ms 0,5]

For each BLOOMQ_BATCH_WAIT_MS value (0 was the default before bursts were coalesced) and each burst size:
N client threads released by one barrier each POST a job; then, from the job records and their event
streams in Redis: the spread of arrivals (``created_at``), the spread of the engine's start on each job (its
prefill began at ``finished_at`` minus ``metrics.inference_seconds``), how long after the last arrival the
last job's prefill began, how many prefill passes the engine ran for the burst (the worker's ``prefills``
counter), the time from the last submission's answer to each job's first token event (Redis stream ids are
millisecond timestamps; the worker publishes text every 100 ms, so this has that granularity), and the
engine's time per decode step.
Prints a table and appends it, with the command, date and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from bench.common import STACK_DEFAULTS, machine, mid_bloom, pct, report, seconds_between, web_up  # noqa: E402
from jobs.keys import job_stream_key  # noqa: E402
from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402

LOGS = ROOT / "test-artifacts" / "bench-burst"
PROMPTS = ["Once upon a time", "从前有一座山", "def quicksort(items):", "The history of the printing press"]
HEARTBEAT = 0.5  # seconds: the worker reports its prefill count this often


def prefills(base: str) -> int:
    return sum(w["prefills"] for w in requests.get(f"{base}/api/v1/workers", timeout=5).json()["workers"])


def burst(base: str, client: redis.Redis, n: int, new_tokens: int) -> dict[str, float]:
    """Submit ``n`` jobs at once; measure how they started."""
    barrier = threading.Barrier(n)
    answered: list[float] = [0.0] * n
    ids: list[str] = [""] * n

    def submit(i: int) -> None:
        session = requests.Session()
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": new_tokens}}
        barrier.wait()
        response = session.post(f"{base}/api/v1/jobs", json=body, timeout=30)
        answered[i] = time.time()
        response.raise_for_status()
        ids[i] = response.json()["id"]

    before = prefills(base)
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = [wait_for(lambda job_id=job_id: _final(base, job_id), timeout=300, what="a burst job") for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs), [j["status"] for j in jobs]
    time.sleep(3 * HEARTBEAT)
    last_submit = max(answered)
    first_tokens = [_first_token_at(client, job_id) - last_submit for job_id in ids]
    origin = jobs[0]["created_at"]
    created = sorted(seconds_between(origin, job["created_at"]) for job in jobs)
    engine_start = sorted(
        seconds_between(origin, job["finished_at"]) - job["metrics"]["inference_seconds"] for job in jobs
    )
    return {
        "arrival_spread_ms": (created[-1] - created[0]) * 1000,
        "start_spread_ms": (engine_start[-1] - engine_start[0]) * 1000,
        "last_start_after_last_arrival_ms": (engine_start[-1] - created[-1]) * 1000,
        "prefills": prefills(base) - before,
        "first_token_p50_ms": pct(first_tokens, 50) * 1000,
        "first_token_max_ms": max(first_tokens) * 1000,
        "step_ms": statistics.median(job["metrics"]["seconds_per_token"] for job in jobs) * 1000,
    }


def _final(base: str, job_id: str) -> dict | None:
    job = requests.get(f"{base}/api/v1/jobs/{job_id}", params={"wait": 10}, timeout=30).json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None


def _first_token_at(client: redis.Redis, job_id: str) -> float:
    for entry_id, fields in client.xrange(job_stream_key(job_id)):
        if fields[b"event"] == b"token":
            return int(entry_id.split(b"-")[0]) / 1000
    raise AssertionError(f"job {job_id} streamed no token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", default="16,64", help="burst sizes, comma-separated")
    parser.add_argument("--wait-ms", default="0,5", help="BLOOMQ_BATCH_WAIT_MS values to compare")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="bursts per size and setting (the median is shown)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".models" / "bench-burst-bloom")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    sizes = [int(x) for x in args.bursts.split(",")]
    waits = [x.strip() for x in args.wait_ms.split(",")]
    model_dir = mid_bloom(args.model_dir)
    LOGS.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-bench-redis-"))).start()
    client = redis.Redis.from_url(redis_server.url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**STACK_DEFAULTS, "BLOOMQ_LOG_LEVEL": "WARNING", "BLOOMQ_MAX_BATCH_SIZE": str(max(sizes)),
           "BLOOMQ_HEARTBEAT_SECONDS": str(HEARTBEAT)}
    web = start_web(redis_server.url, str(model_dir), LOGS / "web.log", port, **env)
    rows = []
    try:
        wait_for(lambda: web_up(base), timeout=30, what="web")
        for wait_ms in waits:
            worker = start_worker(redis_server.url, str(model_dir), LOGS / f"worker-wait{wait_ms}.log",
                                  BLOOMQ_BATCH_WAIT_MS=wait_ms, **env)
            try:
                wait_for(lambda: live_workers(base) >= 1, timeout=120, what="worker")
                burst(base, client, 4, args.new_tokens)  # warm-up
                for n in sizes:
                    runs = [burst(base, client, n, args.new_tokens) for _ in range(args.repeat)]
                    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                    rows.append((wait_ms, n, row))
                    print(f"wait {wait_ms} ms, burst {n}: {row}", flush=True)
            finally:
                worker.stop()
                wait_for(lambda: live_workers(base) == 0, timeout=60, what="worker to leave")
    finally:
        web.stop()
        redis_server.stop()
    report(render(args, rows), record=not args.no_record)
    return 0


def render(args: argparse.Namespace, rows: list[tuple[str, int, dict[str, float]]]) -> str:
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `python bench/burst.py --bursts {args.bursts} "
        f"--wait-ms {args.wait_ms} --new-tokens {args.new_tokens} --repeat {args.repeat}`",
        "",
        f"Machine: {machine()}. Model: random BLOOM, hidden 512, 8 layers, fp32 on CPU; one worker "
        f"(max batch {max(int(x) for x in args.bursts.split(','))}), gevent web. Median of {args.repeat} bursts.",
        "",
        "| BLOOMQ_BATCH_WAIT_MS | burst | arrivals spread ms | engine starts spread ms | last start − last arrival ms "
        "| prefills | last submit → first token p50 / max ms | decode step ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wait_ms, n, row in rows:
        lines.append(f"| {wait_ms} | {n} | {row['arrival_spread_ms']:.0f} | {row['start_spread_ms']:.0f} | "
                     f"{row['last_start_after_last_arrival_ms']:.0f} | {row['prefills']:.0f} | "
                     f"{row['first_token_p50_ms']:.0f} / {row['first_token_max_ms']:.0f} | {row['step_ms']:.1f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

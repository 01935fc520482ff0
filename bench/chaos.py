"""Chaos run at scale: N jobs while the worker is SIGKILLed several times and Redis restarts once.

    make chaos            # or: python bench/chaos.py [--jobs 1000] [--kills 5]

Uses a tiny random BLOOM (built on the spot) so the run is about the queue, not the model. Prints a
table and appends it, with the command, date and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import chaos_model, fresh_logs, machine  # noqa: E402
from tests.chaos import run_chaos  # noqa: E402
from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402

LOGS = ROOT / "test-artifacts" / "chaos"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    model = chaos_model()
    fresh_logs(LOGS)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-chaos-")), appendonly=True).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BLOOMQ_LOG_LEVEL": "INFO", "BLOOMQ_MAX_BATCH_SIZE": "16"}
    web = start_web(redis.url, str(model), LOGS / "web.log", port, **env)
    worker = start_worker(redis.url, str(model), LOGS / "worker.log", **env)
    try:
        wait_for(lambda: live_workers(base) >= 1, timeout=120, what="the worker")
        report = run_chaos(base, redis, [worker.log_path], jobs=args.jobs, kills=args.kills,
                           redis_restarts=args.redis_restarts, max_new_tokens=(16, 256), timeout=1800)
        metrics = requests.get(f"{base}/metrics", timeout=10).text
    finally:
        worker.stop()
        web.stop()
        redis.stop()
    requeued = (LOGS / "worker.log").read_text(errors="replace").count("requeueing")
    table = "\n".join([
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `python bench/chaos.py --jobs {args.jobs} "
        f"--kills {args.kills}`",
        "",
        f"Machine: {machine()}. Model: tiny random BLOOM (hidden 256, 4 layers), batch up to 16, "
        "max_new_tokens 16..256; Redis with AOF. SIGKILLs counts the kills that happened while jobs were pending.",
        "",
        "| jobs | terminal | succeeded | lost | two final results | worker SIGKILLs | Redis restarts | jobs requeued by the reaper | max attempts | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report.jobs} | {report.terminal} | {report.statuses['succeeded']} | {len(report.lost)} | "
        f"{len(report.duplicated)} | {report.kills} | {report.redis_restarts} | {requeued} | {report.max_attempts} | "
        f"{report.seconds:.0f} |",
        "",
    ])
    print(table)
    print("finished counter from /metrics:",
          [line for line in metrics.splitlines() if line.startswith("bloomq_jobs_finished_total")])
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write("\n" + table)
    ok = not report.lost and not report.duplicated and report.terminal == report.jobs
    return 0 if ok else 1


if __name__ == "__main__":
    # A SIGTERM ends the run through the normal exit path, so the processes it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

"""Priorities and fair share, through the real stack (web, Redis, one CPU worker).

    make bench-priorities   # or: python bench/priorities.py [--lines 2000] [--probes 30]

1. A batch of N lines fills the worker; interactive jobs are then submitted one at a time, and each one's
   wait is measured: from its submission to the engine starting it (its prefill began at ``finished_at``
   minus ``metrics.inference_seconds``). Side by side: the same N lines sent as ordinary interactive jobs
   (one FIFO class, as before priorities), with the same probes behind them.
2. Two API keys each submit a batch of M lines, one right after the other: lines completed per key while
   both were running, and their ratio.

Prints a table and appends it, with the command, date and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import STACK_DEFAULTS, machine, mid_bloom, pct, report, seconds_between, web_up  # noqa: E402
from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402

LOGS = ROOT / "test-artifacts" / "bench-priorities"
KEYS = ("bench-key-a", "bench-key-b")
PROMPTS = ["Once upon a time", "从前有一座山", "def quicksort(items):", "The history of the printing press"]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _batch(base: str, key: str, lines: int, tokens: int, model: str) -> str:
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}}
            for i in range(lines)]
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    upload = requests.post(f"{base}/v1/files", headers=_auth(key), files={"file": ("b.jsonl", content)},
                           data={"purpose": "batch"}, timeout=60).json()
    body = {"input_file_id": upload["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    return requests.post(f"{base}/v1/batches", headers=_auth(key), json=body, timeout=600).json()["id"]


def _counts(base: str, key: str, batch_id: str) -> dict:
    return requests.get(f"{base}/v1/batches/{batch_id}", headers=_auth(key), timeout=30).json()


def _submit(base: str, prompt: str, tokens: int) -> str:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
    return requests.post(f"{base}/api/v1/jobs", headers=_auth(KEYS[0]), json=body, timeout=30).json()["id"]


def _waited(base: str, job_id: str) -> float:
    """Seconds from submission to the engine starting the job."""
    while True:
        job = requests.get(f"{base}/api/v1/jobs/{job_id}", params={"wait": 60}, headers=_auth(KEYS[0]),
                           timeout=90).json()
        if job["status"] != "queued" and job["status"] != "running":
            break
    assert job["status"] == "succeeded", job
    return seconds_between(job["created_at"], job["finished_at"]) - job["metrics"]["inference_seconds"]


def probe(base: str, n: int) -> list[float]:
    """``n`` interactive jobs, one after the other; each one's wait."""
    return [_waited(base, _submit(base, "Urgent: what is the capital of France?", 8)) for _ in range(n)]


def with_priorities(base: str, args: argparse.Namespace, model: str) -> dict[str, float]:
    batch = _batch(base, KEYS[0], args.lines, args.tokens, model)
    wait_for(lambda: _counts(base, KEYS[0], batch)["request_counts"]["completed"] >= 1, timeout=600, what="batch")
    waits = probe(base, args.probes)
    requests.post(f"{base}/v1/batches/{batch}/cancel", headers=_auth(KEYS[0]), timeout=600)
    wait_for(lambda: _counts(base, KEYS[0], batch)["status"] == "cancelled", timeout=600, what="cancel")
    return {"p50": pct(waits, 50), "p95": pct(waits, 95), "max": max(waits)}


def without_priorities(base: str, args: argparse.Namespace) -> dict[str, float]:
    ids = [_submit(base, PROMPTS[i % len(PROMPTS)], args.tokens) for i in range(args.lines)]
    wait_for(lambda: requests.get(f"{base}/api/v1/jobs/{ids[0]}", headers=_auth(KEYS[0]), timeout=30).json()[
        "status"] != "queued", timeout=600, what="the flood to start")
    # Probes a second apart, not waiting for each other: each waits behind what was queued before it.
    probes = []
    for _ in range(5):
        probes.append(_submit(base, "Urgent: what is the capital of France?", 8))
        time.sleep(1)
    waits = [_waited(base, job_id) for job_id in probes]
    for job_id in ids:
        requests.post(f"{base}/api/v1/jobs/{job_id}/cancel", headers=_auth(KEYS[0]), timeout=30)
    return {"p50": pct(waits, 50), "p95": pct(waits, 95), "max": max(waits)}


def fairness(base: str, args: argparse.Namespace, model: str) -> dict[str, float]:
    a = _batch(base, KEYS[0], args.fair_lines, args.tokens, model)
    b = _batch(base, KEYS[1], args.fair_lines, args.tokens, model)
    started = time.monotonic()
    while True:
        ca, cb = (_counts(base, k, i) for k, i in ((KEYS[0], a), (KEYS[1], b)))
        if ca["status"] != "in_progress" or cb["status"] != "in_progress":
            break
        time.sleep(0.5)
    done_a, done_b = ca["request_counts"]["completed"], cb["request_counts"]["completed"]
    for key, batch in ((KEYS[0], a), (KEYS[1], b)):
        requests.post(f"{base}/v1/batches/{batch}/cancel", headers=_auth(key), timeout=600)
    return {"a": done_a, "b": done_b, "ratio": max(done_a, done_b) / max(1, min(done_a, done_b)),
            "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--fair-lines", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each batch line")
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".models" / "bench-burst-bloom")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    model_dir = mid_bloom(args.model_dir)
    LOGS.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-bench-redis-"))).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**STACK_DEFAULTS, "BLOOMQ_LOG_LEVEL": "WARNING", "BLOOMQ_MAX_BATCH_SIZE": str(args.batch_size),
           "BLOOMQ_API_KEYS": ",".join(KEYS), "BLOOMQ_MAX_QUEUE": str(args.lines * 2)}
    web = start_web(redis_server.url, str(model_dir), LOGS / "web.log", port, **env)
    worker = start_worker(redis_server.url, str(model_dir), LOGS / "worker.log", **env)
    try:
        wait_for(lambda: web_up(base), timeout=30, what="web")
        wait_for(lambda: live_workers(base, _auth(KEYS[0])) >= 1, timeout=120, what="worker")
        print("batch + interactive probes, with priorities ...", flush=True)
        prio = with_priorities(base, args, model_dir.name)
        print(f"  {prio}", flush=True)
        print("the same load as one FIFO class ...", flush=True)
        fifo = without_priorities(base, args)
        print(f"  {fifo}", flush=True)
        print("two keys' batches ...", flush=True)
        fair = fairness(base, args, model_dir.name)
        print(f"  {fair}", flush=True)
    finally:
        worker.stop()
        web.stop()
        redis_server.stop()
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `python bench/priorities.py --lines {args.lines} "
        f"--fair-lines {args.fair_lines} --tokens {args.tokens} --probes {args.probes} --batch-size {args.batch_size}`",
        "",
        f"Machine: {machine()}. Model: random BLOOM, hidden 512, 8 layers, fp32 on CPU; one worker, max batch "
        f"{args.batch_size}. Probes: interactive jobs of 8 new tokens submitted one at a time behind {args.lines} "
        f"queued lines of {args.tokens} tokens; wait = submission to the engine starting the job.",
        "",
        "| setup | probe wait p50 s | p95 s | max s |",
        "|---|---:|---:|---:|",
        f"| priorities: the lines as a batch | {prio['p50']:.3f} | {prio['p95']:.3f} | {prio['max']:.3f} |",
        f"| no priorities: the lines as ordinary jobs (one FIFO) | {fifo['p50']:.3f} | {fifo['p95']:.3f} | "
        f"{fifo['max']:.3f} |",
        "",
        f"- Fair share: two keys' batches of {args.fair_lines} lines, key A's submitted first: when the first "
        f"batch ended ({fair['seconds']:.0f} s), A had {fair['a']} lines done and B {fair['b']}: ratio "
        f"{fair['ratio']:.2f} (target ≤ 1.2).",
        "",
    ]
    report("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

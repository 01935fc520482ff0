"""Batching benchmark through the real stack (web API -> Redis -> Celery worker), side by side.

    make bench            # or: python bench/throughput.py [--jobs 32] [--model-dir DIR]

On a random-init model of the real bloom-560m shape (hidden 1024, 24 layers, 16 heads, vocab 250880):

1. N concurrent greedy jobs, max_new_tokens drawn from 8..128 with a fixed seed:
   (a) bloomq with continuous batching, (b) bloomq with BLOOMQ_MAX_BATCH_SIZE=1,
   (c) in-process transformers generate() on static left-padded batches of the same prompts (no queue);
2. queue overhead: single short jobs one after another, end-to-end latency minus model time;
3. intake: submits/s that web + Redis sustain with no worker running (every accepted job checked in Redis).

Prints a table and appends it, with the command, date and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from bench.common import (  # noqa: E402
    PROMPTS,
    STACK_DEFAULTS,
    bloom_560m_shape,
    machine,
    pct,
    report,
    seconds_between,
    summarise,
    web_up,
    workload,
)
from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402

LOGS = ROOT / "test-artifacts" / "bench"


def run_stack_jobs(base: str, jobs: list[tuple[str, int]]) -> dict[str, float]:
    """Submit all jobs at once, wait for all; throughput from wall time, latency from the job records."""
    session = requests.Session()

    def submit(job: tuple[str, int]) -> str:
        body = {"inputs": job[0], "parameters": {"max_new_tokens": job[1], "do_sample": False}}
        response = requests.post(f"{base}/api/v1/jobs", json=body, timeout=30)
        response.raise_for_status()
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(submit, jobs))
    pending, done = set(ids), {}
    while pending:
        for job_id in list(pending):
            body = session.get(f"{base}/api/v1/jobs/{job_id}", timeout=30).json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                done[job_id] = body
                pending.discard(job_id)
        # Slow polling on purpose: latencies come from the job records, and the CPU is the model's.
        time.sleep(1.0)
    failed = [b for b in done.values() if b["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]['error']}")
    first_created = min(done[i]["created_at"] for i in ids)
    wall = max(seconds_between(first_created, done[i]["finished_at"]) for i in ids)
    latencies = [seconds_between(done[i]["created_at"], done[i]["finished_at"]) for i in ids]
    return summarise(latencies, sum(done[i]["output"]["generated_tokens"] for i in ids), wall)


def run_static_generate(model_dir: Path, jobs: list[tuple[str, int]], batch_size: int) -> dict[str, float]:
    """transformers generate() on static left-padded batches, in arrival order, all jobs arriving at t=0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    latencies, tokens = [], 0
    start = time.perf_counter()
    for offset in range(0, len(jobs), batch_size):
        group = jobs[offset : offset + batch_size]
        enc = tokenizer([p for p, _ in group], return_tensors="pt", padding=True)
        longest = max(n for _, n in group)
        with torch.inference_mode():
            # A static batch runs until its longest request is done; shorter ones ride along.
            out = model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
        elapsed = time.perf_counter() - start
        assert out.shape[1] - enc.input_ids.shape[1] == longest
        latencies += [elapsed] * len(group)
        tokens += sum(n for _, n in group)
    wall = time.perf_counter() - start
    del model
    return summarise(latencies, tokens, wall)


def run_overhead(base: str, n: int) -> dict[str, float]:
    """Short jobs one after another: client-observed latency minus the worker's model time."""
    session = requests.Session()
    observed, in_system = [], []
    for i in range(n):
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 1}}
        t0 = time.perf_counter()
        job = session.post(f"{base}/api/v1/jobs", json=body, timeout=30).json()
        polled = session.get(f"{base}/api/v1/jobs/{job['id']}?wait=30", timeout=60).json()  # long poll
        assert polled["status"] == "succeeded", polled
        t1 = time.perf_counter()
        model_time = polled["metrics"]["inference_seconds"]
        observed.append(t1 - t0 - model_time)
        in_system.append(seconds_between(polled["created_at"], polled["finished_at"]) - model_time)
    return {
        "p50_ms": 1000 * pct(observed, 50),
        "p95_ms": 1000 * pct(observed, 95),
        "system_p50_ms": 1000 * pct(in_system, 50),
        "system_p95_ms": 1000 * pct(in_system, 95),
    }


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"inputs": "intake benchmark", "parameters": {"max_new_tokens": 8}}'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) accepted = 0; other = 0 end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  io.write(string.format("ACCEPTED %d OTHER %d\\n", a, o))
end
"""


def run_intake_wrk(base: str, redis_url: str, queue: str, seconds: int, clients: int) -> dict[str, float] | None:
    """Submissions per second from wrk (a C load generator, so the client costs little CPU)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    script = LOGS / "intake.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        [wrk, "-t", "2", "-c", str(clients), "-d", f"{seconds}s", "-s", str(script), f"{base}/api/v1/jobs"],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"ACCEPTED (\d+) OTHER (\d+)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match and rate, out
    accepted, other = int(match.group(1)), int(match.group(2))
    r = redis.Redis.from_url(redis_url)
    stored = sum(1 for _ in r.scan_iter("bloomq:job:*", count=1000))
    return {"submits_per_s": accepted / seconds, "wrk_requests_per_s": float(rate.group(1)), "accepted": accepted,
            "attempted": accepted + other, "stored": stored, "queued": r.llen(queue), "client": "wrk"}


def run_intake(base: str, redis_url: str, queue: str, n: int, clients: int) -> dict[str, float]:
    """Submissions per second with no worker consuming; then check every accepted job is in Redis."""
    accepted: list[str] = []
    lock = threading.Lock()
    per_client = n // clients

    def client(_: int) -> None:
        session = requests.Session()
        mine = []
        for i in range(per_client):
            response = session.post(f"{base}/api/v1/jobs", json={"inputs": f"intake {i}"}, timeout=30)
            if response.status_code == 202:
                mine.append(response.json()["id"])
        with lock:
            accepted.extend(mine)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    r = redis.Redis.from_url(redis_url)
    stored = sum(r.pipeline().exists(*(f"bloomq:job:{j}" for j in chunk)).execute()[0]
                 for chunk in _chunks(accepted, 500))
    queued = r.llen(queue)
    return {"submits_per_s": len(accepted) / wall, "accepted": len(accepted), "stored": stored, "queued": queued,
            "attempted": per_client * clients, "client": "python requests"}


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="BLOOMQ_MAX_BATCH_SIZE for (a), batch for (c)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".models" / "bench-bloom-560m")
    parser.add_argument("--overhead-jobs", type=int, default=50)
    parser.add_argument("--intake-jobs", type=int, default=3000)
    parser.add_argument("--intake-clients", type=int, default=16)
    parser.add_argument("--intake-seconds", type=int, default=10, help="duration of the wrk intake run")
    parser.add_argument("--skip-baseline", action="store_true", help="skip (b), the slowest part")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    model_dir = bloom_560m_shape(args.model_dir)
    jobs = workload(args.jobs)
    LOGS.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-bench-redis-"))).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start_web(redis_server.url, str(model_dir), LOGS / "web.log", port, BLOOMQ_LOG_LEVEL="WARNING")
    env = {**STACK_DEFAULTS, "BLOOMQ_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    try:
        wait_for(lambda: web_up(base), timeout=30, what="web")

        def with_worker(batch_size: int, fn):
            worker = start_worker(redis_server.url, str(model_dir), LOGS / f"worker-b{batch_size}.log",
                                  BLOOMQ_MAX_BATCH_SIZE=str(batch_size), **env)
            try:
                wait_for(lambda: live_workers(base) >= 1, timeout=300, what="worker")
                run_stack_jobs(base, [(PROMPTS[0], 4)])  # warm-up
                return fn()
            finally:
                worker.stop()
                wait_for(lambda: live_workers(base) == 0, timeout=60, what="worker to leave")

        print(f"(a) bloomq, continuous batching (max batch {args.batch_size}) ...", flush=True)
        results["a"] = with_worker(args.batch_size, lambda: run_stack_jobs(base, jobs))
        print("    queue overhead ...", flush=True)
        overhead = with_worker(args.batch_size, lambda: run_overhead(base, args.overhead_jobs))
        if not args.skip_baseline:
            print("(b) bloomq, one job at a time (BLOOMQ_MAX_BATCH_SIZE=1) ...", flush=True)
            results["b"] = with_worker(1, lambda: run_stack_jobs(base, jobs))
        print("    intake with no worker ...", flush=True)
        queue = f"bloomq.{model_dir.name}"
        redis.Redis.from_url(redis_server.url).flushdb()  # count only what the intake run writes
        intake = run_intake_wrk(base, redis_server.url, queue, args.intake_seconds, args.intake_clients)
        if intake is None:
            intake = run_intake(base, redis_server.url, queue, args.intake_jobs, args.intake_clients)
    finally:
        web.stop()
        redis_server.stop()
    print(f"(c) transformers generate, static batches of {args.batch_size} ...", flush=True)
    results["c"] = run_static_generate(model_dir, jobs, args.batch_size)

    report(render(args, results, overhead, intake), record=not args.no_record)
    return 0


def render(args, results, overhead, intake) -> str:
    names = {
        "a": f"(a) bloomq, continuous batching (max {args.batch_size})",
        "b": "(b) bloomq, BLOOMQ_MAX_BATCH_SIZE=1",
        "c": f"(c) HF generate, static batches of {args.batch_size}",
    }
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `python bench/throughput.py --jobs {args.jobs}"
        f" --batch-size {args.batch_size}`",
        "",
        f"Machine: {machine()}. Model: random-init bloom-560m shape (hidden 1024, 24 layers, 16 heads, "
        f"vocab 250880), fp32 on CPU. {args.jobs} greedy jobs, max_new_tokens drawn from 8..128 (seed 1234).",
        "",
        "| setup | jobs/s | generated tok/s | mean latency s | p95 latency s | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("a", "b", "c"):
        if key in results:
            r = results[key]
            lines.append(f"| {names[key]} | {r['jobs_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
                         f"{r['mean_latency']:.1f} | {r['p95_latency']:.1f} | {r['wall']:.1f} |")
    lines.append("")
    ratios = []
    if "b" in results:
        ratios.append(f"(a)/(b) jobs/s = {results['a']['jobs_per_s'] / results['b']['jobs_per_s']:.2f}× (target ≥ 6×)")
    ratios.append(f"(a)/(c) jobs/s = {results['a']['jobs_per_s'] / results['c']['jobs_per_s']:.2f}× (target ≥ 1.3×); "
                  f"mean latency (a) {results['a']['mean_latency']:.1f} s vs (c) {results['c']['mean_latency']:.1f} s")
    lines.append("- " + "\n- ".join(ratios))
    lines.append(
        f"- Queue overhead ({args.overhead_jobs} sequential 1-token jobs, latency seen by an HTTP client "
        f"minus model time): p50 {overhead['p50_ms']:.1f} ms, p95 {overhead['p95_ms']:.1f} ms "
        f"(targets ≤ 5 / ≤ 20 ms); inside the system (created→finished minus model time): "
        f"p50 {overhead['system_p50_ms']:.1f} ms, p95 {overhead['system_p95_ms']:.1f} ms"
    )
    lines.append(
        f"- Intake with no worker ({args.intake_clients} connections, {intake['client']}): "
        f"{intake['submits_per_s']:.0f} submits/s (target ≥ 1000); {intake['accepted']}/{intake['attempted']} "
        f"accepted, {intake['stored']} job records and {intake['queued']} queue messages in Redis afterwards"
    )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    # A SIGTERM ends the run through the normal exit path, so the processes it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

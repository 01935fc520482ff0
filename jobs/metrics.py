"""Job metrics kept in Redis, so every web process and every worker machine adds to the same numbers.

Counters and histograms are Redis hashes updated in the same transaction as the job transition they
count (a job is counted finished exactly once, whichever process finished it). The web turns them into
Prometheus metrics on ``/metrics`` (see ``web/metrics.py``); any number of gunicorn processes serve the
same figures, with no multiprocess directory to share.
"""

from __future__ import annotations

import math
from typing import Any

import redis

from jobs.schema import Job

PREFIX = "bloomq:metrics:"
SUBMITTED = PREFIX + "submitted"  # field: model
FINISHED = PREFIX + "finished"  # field: model \x1f status
SEP = "\x1f"

INF = math.inf
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "queue_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, INF),
    "inference_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, INF),
    "end_to_end_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, INF),
    "generated_tokens": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, INF),
    "batch_size": (1, 2, 4, 8, 16, 32, 64, 128, INF),
    "time_to_first_token_seconds": (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, INF),
    "seconds_per_token": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, INF),
}


def _hist_key(name: str) -> str:
    return f"{PREFIX}hist:{name}"


def observe(pipe: Any, name: str, model: str, value: float, times: int = 1) -> None:
    """Count ``value`` (``times`` times) in histogram ``name`` for ``model``."""
    bounds = HISTOGRAMS[name]
    bucket = next(b for b in bounds if value <= b)
    key = _hist_key(name)
    pipe.hincrby(key, f"{model}{SEP}{bucket}", times)
    pipe.hincrby(key, f"{model}{SEP}count", times)
    pipe.hincrbyfloat(key, f"{model}{SEP}sum", value * times)


def record_submitted(pipe: Any, job: Job) -> None:
    pipe.hincrby(SUBMITTED, job.model, 1)


def unrecord_submitted(pipe: Any, job: Job) -> None:
    """A submission was refused after its job was stored (and is now deleted): it does not count."""
    pipe.hincrby(SUBMITTED, job.model, -1)


def record_finished(pipe: Any, job: Job) -> None:
    """A job reached its final state: count it and its timings."""
    pipe.hincrby(FINISHED, f"{job.model}{SEP}{job.status.value}", 1)
    if job.metrics.queue_seconds is not None:
        observe(pipe, "queue_seconds", job.model, job.metrics.queue_seconds)
    if job.metrics.inference_seconds is not None:
        observe(pipe, "inference_seconds", job.model, job.metrics.inference_seconds)
    if job.finished_at is not None:
        observe(pipe, "end_to_end_seconds", job.model, (job.finished_at - job.created_at).total_seconds())
    if job.output is not None:
        observe(pipe, "generated_tokens", job.model, job.output.generated_tokens)
    if job.metrics.time_to_first_token is not None:
        observe(pipe, "time_to_first_token_seconds", job.model, job.metrics.time_to_first_token)
    if job.metrics.seconds_per_token is not None:
        observe(pipe, "seconds_per_token", job.model, job.metrics.seconds_per_token)


def record_batch_sizes(client: redis.Redis, model: str, counts: dict[int, int]) -> None:
    """Add decode steps by batch size (a worker flushes these with its heartbeat)."""
    if not counts:
        return
    pipe = client.pipeline(transaction=False)
    for size, steps in counts.items():
        observe(pipe, "batch_size", model, size, steps)
    pipe.execute()


def read_counters(client: redis.Redis) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Submitted jobs by model, finished jobs by (model, status)."""
    submitted = {k.decode(): int(v) for k, v in client.hgetall(SUBMITTED).items()}
    finished = {}
    for key, value in client.hgetall(FINISHED).items():
        model, status = key.decode().split(SEP, 1)
        finished[(model, status)] = int(value)
    return submitted, finished


def read_histogram(client: redis.Redis, name: str) -> dict[str, dict[str, float]]:
    """model -> {bucket bound as text, "count", "sum"} -> value (bucket counts not cumulative)."""
    result: dict[str, dict[str, float]] = {}
    for key, value in client.hgetall(_hist_key(name)).items():
        model, field = key.decode().split(SEP, 1)
        result.setdefault(model, {})[field] = float(value)
    return result

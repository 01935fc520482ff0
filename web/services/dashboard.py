"""The live dashboard's figures: per model (queues, rows, tokens per second, queue wait, failures, the
last 15 minutes) and per worker, gathered in one round of Redis reads and kept for a couple of seconds,
so any number of open dashboards cost the same as one."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from config.models import queue_for
from jobs.activity import quantile, read_activity
from web.services.jobs import JobService

FRESH_SECONDS = 2.0  # how long one gathering serves every viewer
SERIES_MINUTES = 15
RECENT_MINUTES = 5


class Dashboard:
    def __init__(self, service: JobService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._figures: dict[str, Any] | None = None
        self._at = -1e9

    def figures(self) -> dict[str, Any]:
        """The current figures (gathered at most every FRESH_SECONDS, whoever asks)."""
        with self._lock:
            if self._figures is None or time.monotonic() - self._at > FRESH_SECONDS:
                self._figures = self._gather()
                self._at = time.monotonic()
            return self._figures

    def _gather(self) -> dict[str, Any]:
        svc = self.service
        models = svc.models()
        workers = svc.live_workers()
        minutes, activity = read_activity(svc.store.redis, SERIES_MINUTES)
        pipe = svc.store.redis.pipeline(transaction=False)
        for model in models:
            pipe.llen(queue_for(model["name"], "batch"))
        batch_messages = pipe.execute()
        rows = []
        for model, batch_depth in zip(models, batch_messages, strict=True):
            name = model["name"]
            mine = [w for w in workers if w.model == name]
            series = activity.get(name, [{} for _ in minutes])
            recent = series[-RECENT_MINUTES:]
            failures: Counter[str] = Counter()
            for minute in recent:
                for figure, count in minute.items():
                    if figure.startswith("failed:"):
                        failures[figure.removeprefix("failed:")] += count
            recent_tokens = sum(m.get("tokens", 0) for m in recent)
            rows.append({
                "name": name,
                "default": model["default"],
                "queue_interactive": model["queue_depth"],
                "queue_batch": batch_depth + svc.batch_queue.depth(name),
                "workers": len(mine),
                "jobs_running": sum(w.jobs_running for w in mine),
                "rows_capacity": sum(w.batch_capacity for w in mine),
                "tokens_per_second": round(recent_tokens / (RECENT_MINUTES * 60), 3),
                "finished_last_5m": sum(m.get("finished", 0) for m in recent),
                "queue_wait_p50": quantile(recent, "wait", 0.5),
                "queue_wait_p95": quantile(recent, "wait", 0.95),
                "first_token_p50": quantile(recent, "ttft", 0.5),
                "first_token_p95": quantile(recent, "ttft", 0.95),
                "failures_last_5m": dict(sorted(failures.items())),
                "series": {
                    "tokens_per_minute": [m.get("tokens", 0) for m in series],
                    "finished_per_minute": [m.get("finished", 0) for m in series],
                },
            })
        return {
            "generated_at": time.time(),
            "minutes": [minute * 60 for minute in minutes],
            "models": rows,
            "workers": [{
                "instance": w.instance, "model": w.model, "host": w.host, "device": w.device,
                "devices": w.devices, "rows_in_use": w.jobs_running, "rows_capacity": w.batch_capacity,
                "kv_blocks": w.kv_blocks, "kv_blocks_in_use": w.kv_blocks_in_use, "prefills": w.prefills, "restarts": w.restarts,
                "memory_bytes": w.memory_bytes, "started_at": w.started_at.isoformat(),
                "last_seen": w.last_seen.isoformat(),
            } for w in sorted(workers, key=lambda w: (w.model, w.instance))],
        }

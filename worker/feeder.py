"""The batch feeder: takes batch lines (round robin between API keys) while the engine has rows to spare.

Interactive jobs arrive through Celery and always find a free thread and a free row: the feeder keeps at
most ``rows`` batch lines in this process (running or waiting in the engine), a few rows short of the batch
size, and the engine admits interactive jobs before batch lines.
"""

from __future__ import annotations

import logging
import threading

import redis

from jobs.queues import BatchQueue
from worker.runner import JobRunner

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.2  # how long the feeder waits before looking again when no line is waiting


def batch_rows(max_batch_size: int) -> int:
    """Rows batch lines may take: the rest (an eighth, at least one) stays free for interactive jobs."""
    return max(1, max_batch_size - max(1, max_batch_size // 8))


class BatchFeeder:
    """One thread that takes lines, and one thread per line in flight (outside Celery's pool)."""

    def __init__(self, queue: BatchQueue, model: str, runner: JobRunner, rows: int) -> None:
        self.queue = queue
        self.instance = runner.instance
        self.model = model
        self.runner = runner
        self.rows = rows
        self._slots = threading.BoundedSemaphore(rows)
        self._stop = threading.Event()
        self._lines: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bloomq-batch-feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take no more lines; let the ones in flight finish (a warm shutdown, as Celery's)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            lines = list(self._lines)
        for line in lines:
            line.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=IDLE_SECONDS):
                continue
            try:
                job_id = self.queue.take(self.model, self.instance)
            except redis.RedisError as exc:
                log.warning("batch feeder: Redis unavailable (%s); retrying", exc)
                job_id = None
            if job_id is None:
                self._slots.release()
                self._stop.wait(IDLE_SECONDS)
                continue
            line = threading.Thread(target=self._line, args=(job_id,), name=f"bloomq-batch-{job_id}", daemon=True)
            with self._lock:
                self._lines.add(line)
            line.start()

    def _line(self, job_id: str) -> None:
        try:
            self.runner.run(job_id)
            self.queue.done(self.instance, job_id)
        except Exception:  # the runner stores failures itself; this only keeps the feeder alive
            log.exception("job %s: batch line broke", job_id)
        finally:
            with self._lock:
                self._lines.discard(threading.current_thread())
            self._slots.release()

"""The progress publisher: one thread per worker process streaming every running job's new text."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis

from jobs.progress import ProgressUpdate
from jobs.schema import JobOutput
from jobs.store import JobStore
from worker.engine.core import Engine
from worker.engine.sequence import Sequence

log = logging.getLogger(__name__)

STREAM_INTERVAL = 0.1  # seconds between token events on a job's stream
PROGRESS_INTERVAL = 0.25  # seconds between partial-output writes to the job record


@dataclass
class _Followed:
    seq: Sequence
    attempt: int
    sent: str = ""
    sent_tokens: int = 0  # tokens already streamed one by one (jobs that asked for details)
    restarts: int = 0  # the sequence's restart count when its text was last sent
    last_progress: float = 0.0


class ProgressPublisher:
    """Every ``STREAM_INTERVAL`` it decodes what each running sequence has generated, appends the new text
    to the jobs' event streams and, every ``PROGRESS_INTERVAL``, their partial outputs to the records --
    all in one Redis round trip, and without a thread or a write per token.

    The store's reply says which jobs to stop: ``on_cancel`` for a cancel request, ``on_superseded`` for
    a job this attempt no longer owns (requeued or taken over while it ran).
    """

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        on_cancel: Callable[[str], object],
        on_superseded: Callable[[str], object] | None = None,
        threaded: bool = True,
    ) -> None:
        self.store = store
        self.threaded = threaded  # False: no thread of its own; the caller calls ``tick`` (tests do)
        self.engine = engine
        self.on_cancel = on_cancel
        self.on_superseded = on_superseded or on_cancel
        self._followed: dict[str, _Followed] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def follow(self, job_id: str, seq: Sequence, attempt: int) -> None:
        """Start publishing ``seq``'s progress as attempt ``attempt`` of ``job_id``."""
        with self._lock:
            self._followed[job_id] = _Followed(seq, attempt, restarts=seq.restarts, last_progress=time.monotonic())
            if self.threaded and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="bloomq-progress", daemon=True)
                self._thread.start()

    def following(self, job_id: str) -> bool:
        """Whether ``job_id``'s progress is being published."""
        with self._lock:
            return job_id in self._followed

    def forget(self, job_id: str) -> None:
        """Publish the job's last text and stop following it (before its final result is stored)."""
        with self._lock:
            followed = self._followed.pop(job_id, None)
            if followed is None or followed.seq.error is not None:
                return
            update = self._update(job_id, followed, followed.seq.text, None, final=True)
            if update is not None:
                try:
                    self.store.publish_progress([update])
                except redis.RedisError:  # the final result still carries the whole text
                    log.warning("job %s: could not stream its last text", job_id)

    def _run(self) -> None:
        while True:
            time.sleep(STREAM_INTERVAL)
            try:
                self.tick()
            except Exception:
                log.warning("progress publishing failed; retrying", exc_info=True)
            with self._lock:
                if not self._followed:  # idle: the next follow() starts a new thread
                    self._thread = None
                    return

    def tick(self) -> None:
        """Publish what changed since the last tick (the thread calls this; tests may too)."""
        with self._lock:
            now = time.monotonic()
            pending = []
            for job_id, followed in self._followed.items():
                seq = followed.seq
                text = self.engine.partial_text(seq)
                output = None
                if now - followed.last_progress >= PROGRESS_INTERVAL:
                    output = JobOutput(generated_text=text, generated_tokens=len(seq.tokens), seed=seq.sampling.seed)
                update = self._update(job_id, followed, text, output)
                if update is not None:
                    pending.append((followed, text, update))
            reply = self.store.publish_progress([update for _, _, update in pending])
            # Only now that Redis has the text does it count as sent (a failed write is retried next tick).
            for followed, text, update in pending:
                if update.restarted:
                    followed.restarts = followed.seq.restarts
                    followed.sent = ""
                    followed.sent_tokens = 0
                if update.delta:
                    followed.sent = text
                if update.token_details:
                    followed.sent_tokens += len(update.token_details)
                if update.output is not None:
                    followed.last_progress = now
        for job_id in reply.cancel:
            self.on_cancel(job_id)
        for job_id in reply.superseded:
            self.on_superseded(job_id)

    def _update(
        self, job_id: str, followed: _Followed, text: str, output: JobOutput | None, final: bool = False
    ) -> ProgressUpdate | None:
        """The report for ``text``: only what extends the text already sent, or, when the engine started
        the sequence over since, a restart followed by the new text from its beginning. For a job that asked
        for details, the new tokens one by one too (all of them once it is ``final``; while it runs, not the
        last one, whose log-probability may not be recorded yet)."""
        seq = followed.seq
        restarted = seq.restarts != followed.restarts
        sent = "" if restarted else followed.sent
        delta = text[len(sent) :] if text.startswith(sent) else ""
        details = None
        if seq.params.details:
            start = 0 if restarted else followed.sent_tokens
            end = min(len(seq.tokens), len(seq.logprobs)) if final else min(len(seq.tokens), len(seq.logprobs)) - 1
            details = [
                asdict(self.engine.token_detail(seq.tokens[i], seq.logprobs[i])) for i in range(start, max(start, end))
            ]
        if not (delta or restarted or output is not None or details):
            return None
        tokens = len(seq.tokens)
        return ProgressUpdate(job_id, delta, tokens, output, attempt=followed.attempt, restarted=restarted,
                              token_details=details or None)

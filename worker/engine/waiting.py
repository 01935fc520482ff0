"""The requests waiting for a row: added by the callers' threads, admitted by the engine thread (through
the scheduler, most urgent first), preempted rows put back at their head.

An idle engine lets a burst of requests start together: it waits until none has arrived for
``max_wait_seconds`` (the burst is over), the batch is full, or ``BURST_WINDOWS`` such waits have passed
since the first one arrived (a steady trickle does not hold the first one back for long). A waiting
request that is canceled or runs out of time ends before it ever gets a row.
"""

from __future__ import annotations

import collections
import threading
import time

from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence
from worker.engine.text import TextTracker, stop_reason
from worker.engine.triage import RowCap

BURST_WINDOWS = 10  # an idle engine waits for a burst at most this many quiet periods (BLOOMQ_BATCH_WAIT_MS)
IDLE_SECONDS = 0.5  # an engine with nothing to do looks again this often (without being woken)


class WaitingRoom:
    """The waiting sequences, and the condition the engine thread waits on for them (or for a cancel or
    a stop)."""

    def __init__(self, max_wait_seconds: float, stopping: threading.Event) -> None:
        self.quiet = max_wait_seconds
        self.stopping = stopping
        self._seqs: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._seqs)

    def add(self, seq: Sequence) -> None:
        """Queue a new request (from a caller's thread)."""
        with self._cond:
            self._seqs.append(seq)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the engine thread if it waits (a request was canceled, or the engine stops)."""
        with self._cond:
            self._cond.notify_all()

    def put_back(self, seqs: list[Sequence]) -> None:
        """Preempted rows wait for a row again, ahead of those that never ran (they keep their tokens)."""
        with self._cond:
            self._seqs.extendleft(reversed(seqs))

    def empty(self) -> bool:
        """Whether nothing waits."""
        with self._cond:
            return not self._seqs

    def idle(self) -> None:
        """Nothing runs: wait a while for a request (or a stop)."""
        with self._cond:
            if not self._seqs and not self.stopping.is_set():
                self._cond.wait(timeout=IDLE_SECONDS)

    def drain(self) -> list[Sequence]:
        """Take every waiting sequence out (the engine stops)."""
        with self._cond:
            pending = list(self._seqs)
            self._seqs.clear()
        return pending

    def admit(self, scheduler: Scheduler, cap: RowCap) -> None:
        """End the waiting sequences that were canceled or ran out of time, then give the others rows, most
        urgent first, while the row cap and the block pool allow."""
        with self._cond:
            for seq in [s for s in self._seqs if stop_reason(s) is not None]:
                self._seqs.remove(seq)
                seq.text = TextTracker.partial(seq)  # a preempted row may have tokens
                seq.finish(stop_reason(seq))
            if not self._seqs:
                return
            if not scheduler.running:
                cap.allow_one()
                self._wait_for_burst(cap.rows)
            scheduler.admit_waiting(self._seqs, cap.rows)

    def _wait_for_burst(self, cap: int) -> None:
        """With an idle engine, wait for the rest of a burst (see the module's docstring); the lock is held."""
        quiet = self.quiet
        if quiet <= 0:
            return
        limit = self._seqs[0].submitted_at + quiet * BURST_WINDOWS
        while len(self._seqs) < cap and not self.stopping.is_set():
            now = time.perf_counter()
            until = min(self._seqs[-1].submitted_at + quiet, limit)
            if until <= now:
                return
            self._cond.wait(timeout=until - now)

"""The engine's failure policy: when part of a step goes wrong, who pays for it (``worker.engine.faults`` says
whose fault an error is; this module what the engine does about it).

- A forward pass that raises (not out of memory) is probed chunk by chunk: only the chunks that fail alone
  fail their rows; the others' results are kept.
- Choosing tokens for the batch that raises is done again row by row: only the rows whose parameters or
  scores break the sampler fail.
- Out of memory: a row alone in the engine fails; otherwise the less urgent half of the rows gives its
  blocks back and waits (keeping its tokens), and the row cap drops below what failed. It grows back one
  row every ``CAP_RECOVERY_STEPS`` good steps, and to the full batch size once the engine drains.
- A fatal device error stops the engine and hands over to the process (``on_fatal``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from worker.engine.chunk import Chunk
from worker.engine.faults import DeviceFault, OutOfMemory, is_fatal_device_error, out_of_memory, row_error
from worker.engine.sampling import TokenChooser
from worker.engine.scheduler import Planned, Scheduler
from worker.engine.sequence import Sequence
from worker.model.memory import free_device_memory

log = logging.getLogger(__name__)

CAP_RECOVERY_STEPS = 16  # successful steps per extra row, after an out-of-memory
# Times a sequence is preempted by failures it shares with others (out of memory) before it fails: enough
# for the halving to get from the largest batch down to one row.
MAX_RESTARTS = 8
FAILED = object()  # a chunk whose pass failed (its row is already retired or waiting again)


class RowCap:
    """How many rows may run at once: the batch size, lowered after an out-of-memory, grown back slowly
    while steps succeed, and whole again once the engine has drained."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = size  # lowered after an out-of-memory, restored when idle
        self.ceiling = size  # below the size that last ran out of memory

    def allow_one(self) -> None:
        """An idle engine admits at least one row (after a lone retry was ordered, it is admitted alone)."""
        self.rows = max(self.rows, 1)

    def stepped(self, steps: int) -> None:
        """A step succeeded (the ``steps``-th pass): after an out-of-memory, grow back slowly."""
        if self.rows < self.ceiling and steps % CAP_RECOVERY_STEPS == 0:
            self.rows += 1

    def restore(self) -> None:
        """The engine drained cleanly: full size."""
        self.rows = self.ceiling = self.size


class Triage:
    """Applies the policy to the engine's rows: ``retire`` ends a row (with its error), ``wait_again`` puts
    preempted rows back at the head of the waiting line, ``stopping`` stops the engine thread."""

    def __init__(
        self,
        scheduler: Scheduler,
        cap: RowCap,
        device: torch.device,
        retire: Callable[..., None],
        wait_again: Callable[[list[Sequence]], None],
        stopping: threading.Event,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.cap = cap
        self.device = device
        self.retire = retire
        self.wait_again = wait_again
        self.stopping = stopping
        # Called (on the engine thread) when the device fails for good; the worker process then exits.
        self.on_fatal = on_fatal
        self.fatal_error: BaseException | None = None

    def lost_step(self, exc: BaseException, planned: list[Planned]) -> bool:
        """Whether ``exc``, raised by a whole pass, cost every row of it its step (it was fatal, or out of
        memory); the rows are handled when so."""
        if self.fatal(exc, list(self.scheduler.running)):
            return True
        if out_of_memory(exc):
            self.out_of_memory([p.seq for p in planned], exc)
            return True
        return False

    def probe(self, first: BaseException, planned: list[Planned], chunks: list[Chunk],
              forward: Callable[[list[Chunk]], list[Any]]) -> list[Any] | None:
        """After a pass over ``chunks`` raised ``first``: run each chunk alone; those that fail alone fail
        their rows (``FAILED`` in their place). None when no pass counts: a lone chunk failed, or the
        device failed for good."""
        if len(planned) == 1:
            self.retire(planned[0].seq, error=row_error("running the model", first))
            return None
        log.warning("a step of %d rows raised %s: %s; running each alone", len(planned), type(first).__name__, first)
        results: list[Any] = []
        for item, chunk in zip(planned, chunks, strict=True):
            try:
                [logits] = forward([chunk])
            except Exception as alone:
                if self.fatal(alone, list(self.scheduler.running)):
                    return None
                if out_of_memory(alone):
                    self.out_of_memory([item.seq], alone)
                else:
                    self.retire(item.seq, error=row_error("running the model", alone))
                results.append(FAILED)
                continue
            results.append(logits)
        return results

    def choose_rows_alone(self, exc: BaseException, seqs: list[Sequence], logits: torch.Tensor,
                          seen: torch.Tensor, penalty: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[int, Exception]] | None:
        """After choosing for all rows raised ``exc``: each row's token on its own; the rows whose choice
        raises get that error. None when ``exc`` was fatal."""
        if self.fatal(exc, list(self.scheduler.running)):
            return None
        log.warning("choosing tokens for %d rows raised %s: %s; choosing row by row", len(seqs),
                    type(exc).__name__, exc)
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        invalid = torch.zeros(len(seqs), dtype=torch.bool, device=self.device)
        errors: dict[int, Exception] = {}
        for row, seq in enumerate(seqs):
            try:
                alone = TokenChooser([seq.sampling], self.device, [len(seq.tokens)])
                token, bad = alone.choose(logits[row : row + 1], seen[row : row + 1] if penalty else seen)
            except Exception as error:  # this row's parameters or scores break the sampler
                errors[row] = error
                invalid[row] = True
                continue
            tokens[row], invalid[row] = token[0], bad[0]
        return tokens, invalid, errors

    def out_of_memory(self, seqs: list[Sequence], exc: Exception) -> None:
        """Out of memory in a step: a row alone in the engine fails; otherwise the less urgent half of the
        rows gives its blocks back and waits (keeping its tokens), and the row cap drops below what failed.
        A row preempted ``MAX_RESTARTS`` times fails with the error."""
        free_device_memory(self.device)
        running = list(self.scheduler.running)
        cap = self.cap
        cap.ceiling = max(1, min(cap.ceiling, len(running) - 1))
        if len(running) == 1:
            seq = running[0]
            log.warning("a request ran out of memory alone: %s", exc)
            self.retire(seq, error=OutOfMemory(
                f"out of device memory for this request alone ({seq.prompt_len} prompt tokens + "
                f"{seq.max_new_tokens} new): {exc}"))
            return
        cap.rows = max(1, len(running) // 2)
        log.warning("out of memory with %d rows; retrying with at most %d", len(running), cap.rows)
        ordered = sorted(running, key=lambda s: s.rank)
        giving_way = ordered[cap.rows :] or [s for s in seqs if s in running][:1]
        again = []
        for seq in giving_way:
            self.scheduler.preempt(seq)
            if seq.preemptions > MAX_RESTARTS:
                seq.finish(error=OutOfMemory(f"gave up after giving way {seq.preemptions} times: out of device memory"))
            else:
                again.append(seq)
        self.wait_again(again)

    def fatal(self, exc: BaseException, seqs: list[Sequence]) -> bool:
        """If ``exc`` left the device unusable: stop the engine and hand over to ``on_fatal`` (which
        exits the process; its jobs are requeued). True when it did."""
        if not is_fatal_device_error(exc):
            return False
        log.critical("fatal device error with %d requests running: %s: %s", len(seqs), type(exc).__name__, exc)
        self.fatal_error = exc
        self.stopping.set()
        if self.on_fatal is not None:
            self.on_fatal(exc)
        else:
            for seq in seqs:
                seq.finish(error=DeviceFault(f"the device failed: {exc}"))
        return True


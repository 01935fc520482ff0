"""Who runs in the next step, and how much of each: admission, prompt chunks, blocks and priorities.

Each step has a token budget (``step_tokens``). Rows that are decoding take one token each, first; rows
still reading their prompt share what is left, most urgent first, in chunks: a long prompt is read over
several steps while the decoding rows keep producing a token every step.

A waiting request is admitted (most urgent first: interactive before batch, then priority, then arrival)
when a row is free and the pool has the blocks its whole known text needs beyond what the prefix cache
already holds: the longest chain of cached full blocks matching its tokens is shared, not recomputed. A
decoding row takes one more block when it fills its last one; when none is left, the least urgent running
row is *preempted*: it gives its blocks back (they stay cached, so it usually finds most of them again)
and waits at the head of its rank to be readmitted, keeping every token it has. Nothing is padded and
nothing of one row is copied when another joins or leaves.

Pure bookkeeping over ``BlockPool`` and ``Sequence``s: no tensors, no model.
"""

from __future__ import annotations

import time
from collections.abc import MutableSequence
from dataclasses import dataclass

from worker.engine.blocks import BlockPool, chain_hashes
from worker.engine.chunk import ALL, LAST, NONE
from worker.engine.sequence import Sequence

DETAIL_CHUNK = 64  # prompt tokens per step for a row that wants prompt log-probabilities (full-vocabulary logits)


@dataclass
class Planned:
    """A row's part in the next step: positions ``start`` .. ``start + count - 1`` of ``seq.ids``."""

    seq: Sequence
    start: int
    count: int
    logits: str  # ALL, LAST or NONE (see worker.engine.chunk)

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the row's newest token, so the row chooses its next one after it."""
        return self.start + self.count == len(self.seq.ids)


class Scheduler:
    """Running and waiting rows over one block pool."""

    def __init__(self, pool: BlockPool, step_tokens: int, prefix_caching: bool = True) -> None:
        if step_tokens < 1:
            raise ValueError("the step token budget must be at least 1")
        self.pool = pool
        self.step_tokens = step_tokens
        self.prefix_caching = prefix_caching
        self.running: list[Sequence] = []
        # Full prompt blocks a running row will compute (chain hash -> that row): a request whose prefix
        # is being computed waits for it instead of computing the same blocks alongside.
        self._inflight: dict[bytes, Sequence] = {}
        self.reused_tokens = 0  # prompt positions taken from the prefix cache (since start)
        self.computed_tokens = 0  # prompt positions computed

    # -- admission ---------------------------------------------------------------------------------

    def awaits_prefix(self, seq: Sequence) -> bool:
        """Whether ``seq``'s next uncached prompt block is being computed by a running row right now: it
        is better admitted once that block is cached (a few passes), sharing it."""
        if not self.prefix_caching or not self._inflight or wants_prompt_logprobs(seq):
            return False
        hashes = self._prompt_hashes(seq)
        cached = len(self.pool.match(hashes))
        return cached < len(hashes) and hashes[cached] in self._inflight

    def admit_waiting(self, waiting: MutableSequence[Sequence], cap: int) -> None:
        """Give waiting sequences rows, most urgent first (interactive before batch, then by priority, then
        in order of arrival), while ``cap`` rows and the pool allow; the admitted leave ``waiting``. A
        suspect (``isolated``) runs alone: it waits for an empty engine and nobody joins it."""
        running = self.running
        if any(s.isolated for s in running):
            return
        for seq in sorted(waiting, key=lambda s: s.rank):
            if len(running) >= cap:
                break
            if seq.isolated and running:
                break  # it waits for an empty engine
            if self.awaits_prefix(seq):
                continue  # its prefix is being computed: admitted once it is cached, sharing it
            if not self.admit(seq):
                break  # in order: later requests wait rather than overtake
            waiting.remove(seq)
            seq.started_at = seq.started_at or time.perf_counter()  # model time includes the prefill
            if seq.isolated:
                break

    def _prompt_hashes(self, seq: Sequence) -> list[bytes]:
        """Chain hashes of ``seq``'s full blocks before its newest token (cached on the sequence)."""
        size = self.pool.block_size
        full = (len(seq.ids) - 1) // size
        if len(seq.hashes) != full:
            seq.hashes = chain_hashes(seq.ids[: full * size], size)
        return seq.hashes

    def admit(self, seq: Sequence) -> bool:
        """Give ``seq`` a row if the pool has room for its whole known text; False (nothing taken) if not."""
        size = self.pool.block_size
        known = len(seq.ids)
        reuse: list[int] = []
        if self.prefix_caching and not wants_prompt_logprobs(seq):
            # Full blocks before the newest token only: at least one position is always computed, so the
            # row gets the logits it chooses its next token from, and no shared block is ever written.
            reuse = self.pool.match(self._prompt_hashes(seq))
            self.pool.share(reuse)
        else:
            seq.hashes = []
        # Room for every known position (the next token's slot is found when it is fed).
        needed = self.pool.blocks_for(known) - len(reuse)
        if needed > self.pool.available:
            self.pool.give_back(reuse)
            return False
        seq.table = reuse + self.pool.take(needed)
        seq.computed = len(reuse) * size
        seq.indexed = len(reuse)
        reused = min(seq.computed, seq.prompt_len)
        seq.reused_tokens += reused
        self.reused_tokens += reused
        self.running.append(seq)
        for digest in seq.hashes[len(reuse) :]:
            self._inflight.setdefault(digest, seq)
        return True

    def release(self, seq: Sequence) -> None:
        """``seq`` leaves (finished, failed, or preempted): its blocks go back (cached ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        for digest in seq.hashes:
            if self._inflight.get(digest) is seq:
                del self._inflight[digest]
        self.pool.give_back(seq.table)
        seq.table = []
        seq.computed = 0
        seq.indexed = 0

    def preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s row and blocks back; it keeps its tokens and is recomputed when readmitted."""
        self.release(seq)
        seq.preemptions += 1

    def victim(self) -> Sequence | None:
        """The running row to preempt first: the least urgent, the latest admitted among equals."""
        if not self.running:
            return None
        return max(reversed(self.running), key=lambda s: s.rank)

    # -- the next step -----------------------------------------------------------------------------

    def plan(self) -> tuple[list[Planned], list[Sequence]]:
        """The rows of the next step and their chunks, and the rows preempted to find blocks for them."""
        preempted: list[Sequence] = []
        live = set(self.running)  # less those preempted on the way (set lookups: no rows x rows scans)
        decoding = [s for s in self.running if s.pending == 1 and not s.in_prompt]
        decoding_rows = set(decoding)
        reading = sorted((s for s in self.running if s not in decoding_rows), key=lambda s: s.rank)
        planned: list[Planned] = []
        budget = self.step_tokens
        for seq in decoding:
            if seq not in live:
                continue  # preempted for an earlier row's block
            fits = self._room_for(seq, len(seq.ids), preempted)
            live.difference_update(preempted)
            if fits:
                planned.append(Planned(seq, seq.computed, 1, LAST))
                budget -= 1
        for seq in reading:
            if budget <= 0:
                break
            if seq not in live:
                continue
            wants_all = wants_prompt_logprobs(seq)
            count = min(seq.pending, budget, DETAIL_CHUNK if wants_all else seq.pending)
            completes = seq.computed + count == len(seq.ids)
            fits = self._room_for(seq, seq.computed + count, preempted)
            live.difference_update(preempted)
            if fits:
                logits = ALL if wants_all else (LAST if completes else NONE)
                planned.append(Planned(seq, seq.computed, count, logits))
                budget -= count
        planned = [p for p in planned if p.seq in live]
        return planned, preempted

    def _room_for(self, seq: Sequence, positions: int, preempted: list[Sequence]) -> bool:
        """Make ``seq``'s table cover ``positions`` positions, preempting less urgent rows for blocks if
        need be; False when ``seq`` itself had to give way."""
        short = self.pool.blocks_for(positions) - len(seq.table)
        while short > 0 and self.pool.available < short:
            victim = self.victim()  # this row itself when nobody is less urgent or newer
            assert victim is not None  # seq runs
            self.preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        if short > 0:
            seq.table.extend(self.pool.take(short))
        return True

    def ran(self, planned: Planned) -> None:
        """``planned`` ran: its positions are computed; offer the blocks it filled to the prefix index."""
        seq = planned.seq
        seq.computed = planned.start + planned.count
        self.computed_tokens += max(0, min(seq.computed, seq.prompt_len) - planned.start)
        if not self.prefix_caching:
            return
        size = self.pool.block_size
        full = seq.computed // size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else b""
            start = len(seq.hashes) * size
            seq.hashes.extend(chain_hashes(seq.ids[start : full * size], size, parent))
        while seq.indexed < full:
            digest = seq.hashes[seq.indexed]
            self.pool.cache(seq.table[seq.indexed], digest)
            if self._inflight.get(digest) is seq:
                del self._inflight[digest]
            seq.indexed += 1


def wants_prompt_logprobs(seq: Sequence) -> bool:
    """Whether ``seq`` still needs the logits of its prompt positions (``decoder_input_details``)."""
    return bool(seq.params.decoder_input_details) and len(seq.prefill_logprobs) < seq.prompt_len

"""Attention that reads the blocks where they lie: FlexAttention over the whole KV pool, one fused kernel.

``worker.engine.attention`` gathers each row's keys and values out of the pool into a padded copy and calls SDPA:
simple and right everywhere, but on a GPU the copy is as much memory traffic as the attention itself, and a
decode step is bound by memory traffic. Here the kernel is given the pool as it is (``[1, heads, slots,
dim]``, a view, no copy) and a *block mask* per pass that lists, for each row, the pool blocks it may read:

- ``kv_indices``: the row's blocks (its table, in order); the kernel visits those and no others, so a row
  costs the blocks it holds, not the pool;
- ``full`` blocks: those every query of the chunk sees whole (all of a decode row's blocks but its last);
  the others also get ``mask_mod``: a slot is read only if it is this row's and not after the query (a
  masked slot still goes through the kernel with a weight of zero, so the slots after a row's end in its
  last block are kept at zero, never a NaN left from before);
- ``score_mod`` adds ALiBi: ``slope[h] * key_position``, the key's position in its row. A block's position
  in a row is the same in every row that holds it (a shared block is a cached prefix, and its chain hash
  fixes how many blocks come before it), so one ``[blocks]`` table maps a slot to its position.

Decode rows are one call (batch = rows, one query each; the pool is shared by broadcasting); each prompt
chunk is a call of its own (its queries padded up to a multiple of 16; padded queries see nothing).

Whether it runs is chosen at start-up (``choose``): ``BLOOMQ_ATTENTION=auto`` uses it on a GPU after it has
compiled and matched the gathering path on the real pool, and keeps the gathering path on a CPU. There
inductor's kernel is faster for decode rows alone (0.13-0.6x the gathering time, bench/RESULTS.md), but the
engine ran slower with it (a prompt chunk's call, a batch of one, took ~20 ms) and some shapes do not
compile for the CPU; the check at start-up and the fallback below keep a worker serving either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from worker.engine.attention import AttentionPlan
from worker.engine.chunk import Chunk

log = logging.getLogger(__name__)

QUERY_MULTIPLE = 16  # a prompt chunk's queries are padded to a multiple of this (fewer shapes to compile)
# Queries per block of the mask: one constant, so a new chunk width is a new size, never a recompile (the
# kernel specialises on the block sizes); every query block of a chunk lists the chunk's blocks.
QUERY_BLOCK = 128
FAILED: list[str] = []  # why the kernel failed while serving, once it has: this process gathers from then on


@functools.cache
def compiled_kernel() -> Callable[..., torch.Tensor]:
    """FlexAttention compiled (one per process; shapes that vary are made dynamic by torch on the second)."""
    return torch.compile(flex_attention)


class FlexPlan:
    """How one pass attends with FlexAttention: the same interface as ``AttentionPlan``."""

    def __init__(self, chunks: list[Chunk], null_slot: int, device: torch.device, block_size: int,
                 kernel: Callable[..., torch.Tensor] = flex_attention) -> None:
        self.kernel = kernel
        self.gathering = (chunks, null_slot, device, block_size)
        self.fallback: AttentionPlan | None = AttentionPlan(*self.gathering) if FAILED else None
        self.calls: list[_Call] = []
        if self.fallback is not None:
            return
        self.size = block_size
        self.slots = null_slot  # every slot but the null one: a whole number of blocks
        blocks = null_slot // block_size
        offsets, offset = [], 0
        for chunk in chunks:
            offsets.append(offset)
            offset += len(chunk.tokens)
        # Each block's position in the rows holding it (see the module's docstring).
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk.table[: _blocks(chunk.end, block_size)])
        where = torch.tensor([i for chunk in chunks for i in range(_blocks(chunk.end, block_size))],
                             dtype=torch.long)
        self.block_position = torch.zeros(blocks, dtype=torch.long)
        self.block_position[torch.tensor(ids, dtype=torch.long)] = where
        self.block_position = self.block_position.to(device)
        # The slots after each row's end in its last block: the kernel reads those with a weight of zero, so
        # they must hold numbers (the pool starts uninitialised, and a freed block keeps what its last row
        # wrote, a failed row's NaNs included). Zeroed before each layer attends, once a row has written.
        stale = [chunk.table[chunk.end // block_size] * block_size + p % block_size
                 for chunk in chunks if chunk.end % block_size
                 for p in range(chunk.end, _blocks(chunk.end, block_size) * block_size)]
        self.stale = torch.tensor(stale, dtype=torch.long, device=device)
        decode = [i for i, chunk in enumerate(chunks) if len(chunk.tokens) == 1]
        if decode:
            self.calls.append(_Call([chunks[i] for i in decode], [offsets[i] for i in decode], 1, self, device))
        for i, chunk in enumerate(chunks):
            if len(chunk.tokens) > 1:
                width = -(-len(chunk.tokens) // QUERY_MULTIPLE) * QUERY_MULTIPLE
                self.calls.append(_Call([chunk], [offsets[i]], width, self, device))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
               scale: float) -> torch.Tensor:
        """``query``: [tokens, heads, dim] for every token of the pass -> attended values, same shape.

        Should the kernel fail at serving (a shape the start-up check did not compile, say) the pass is
        attended by gathering instead, and so is every pass of this process after it: no row fails for it."""
        if self.fallback is None:
            try:
                return self._attend(query, keys, values, slopes, scale)
            except torch.OutOfMemoryError:
                raise  # the failure policy halves the work
            except Exception as exc:
                if not FAILED:
                    FAILED.append(f"{type(exc).__name__}: {exc}")
                    log.error("FlexAttention failed while serving (%s); this worker gathers rows from now on",
                              FAILED[0].splitlines()[0])
            self.fallback = AttentionPlan(*self.gathering)
        return self.fallback.attend(query, keys, values, slopes, scale)

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        keys.index_fill_(0, self.stale, 0)
        values.index_fill_(0, self.stale, 0)
        k = keys[: self.slots].permute(1, 0, 2).unsqueeze(0)  # [1, heads, slots, dim]: a view of the pool
        v = values[: self.slots].permute(1, 0, 2).unsqueeze(0)
        for call in self.calls:
            call.attend(query, k, v, slopes, scale, out)
        return out


class _Call:
    """One kernel call: ``rows`` chunks of at most ``width`` queries each, and the block mask they read by."""

    def __init__(self, chunks: list[Chunk], offsets: list[int], width: int, plan: FlexPlan,
                 device: torch.device) -> None:
        size, blocks = plan.size, plan.slots // plan.size
        self.width = width
        self.counts = [len(chunk.tokens) for chunk in chunks]
        # Decode rows go in as a batch of at least two: inductor's CPU kernel fails to compile a batch of
        # one single-query row. A padding row has no blocks and sees nothing.
        self.rows = max(len(chunks), 2 if width == 1 else 1)
        # The tokens of the pass that are this call's queries, and where each goes: (row, query index).
        self.tokens = torch.tensor([o + q for o, c in zip(offsets, self.counts, strict=True) for q in range(c)],
                                   dtype=torch.long, device=device)
        self.places = torch.tensor([r * width + q for r, c in enumerate(self.counts) for q in range(c)],
                                   dtype=torch.long, device=device)
        held = [_blocks(chunk.end, size) for chunk in chunks]
        full = [chunk.start // size for chunk in chunks]  # blocks wholly before the chunk's first query
        padding = self.rows - len(chunks)
        held, full = held + [0] * padding, full + [0] * padding
        widest = max(held)
        tables = torch.full((self.rows, widest), -1, dtype=torch.long)
        partial_ids = torch.zeros((self.rows, widest), dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            table = chunk.table[: held[row]]
            tables[row, : held[row]] = torch.tensor(table, dtype=torch.long)
            rest = table[full[row] :]
            partial_ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.int32)
        positions = torch.full((self.rows, width), -1, dtype=torch.long)  # a padded query's: sees nothing
        for row, chunk in enumerate(chunks):
            positions[row, : self.counts[row]] = torch.arange(chunk.start, chunk.end)
        self.tables, self.positions = tables.to(device), positions.to(device)
        self.block_position = plan.block_position

        query_blocks = -(-width // QUERY_BLOCK)

        def spread(ids: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            # Per row and query block: how many blocks, and their ids first (the kernel checks that the
            # index table is as wide as the pool has blocks; it reads only the first ``count``).
            indices = torch.zeros((self.rows, 1, query_blocks, blocks), dtype=torch.int32, device=device)
            indices[:, 0, :, : ids.shape[1]] = ids.to(device).unsqueeze(1)
            numbers = torch.tensor(counts, dtype=torch.int32, device=device).view(self.rows, 1, 1)
            return numbers.expand(-1, -1, query_blocks).contiguous(), indices

        partial = spread(partial_ids, [h - f for h, f in zip(held, full, strict=True)])
        whole = spread(tables.clamp(min=0).to(torch.int32), full)
        self.mask = BlockMask.from_kv_blocks(*partial, *whole, BLOCK_SIZE=(QUERY_BLOCK, size), mask_mod=self._visible,
                                             seq_lengths=(width, plan.slots), compute_q_blocks=False)
        self.size = size
        self.kernel = plan.kernel
        # Triton's kernel reads keys BLOCK_N at a time, which must divide the KV block: its configurations
        # start at 64 or more, BLOOMQ_KV_BLOCK_TOKENS at 16. (Inductor's CPU kernel takes no such option.)
        self.options = {"BLOCK_N": size} if device.type == "cuda" and size < 64 else None
        self.slopes: torch.Tensor | None = None

    def _position(self, slot: torch.Tensor) -> torch.Tensor:
        return self.block_position[slot // self.size] * self.size + slot % self.size

    def _visible(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        block = slot // self.size
        logical = self.block_position[block]
        mine = self.tables[b, logical.clamp(max=self.tables.shape[1] - 1)] == block
        return mine & (logical * self.size + slot % self.size <= self.positions[b, q])

    def _alibi(self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, slot: torch.Tensor
               ) -> torch.Tensor:
        assert self.slopes is not None
        return score + self.slopes[h] * self._position(slot)

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float,
               out: torch.Tensor) -> None:
        self.slopes = slopes
        heads, dim = query.shape[1:]
        q = query.new_zeros((self.rows * self.width, heads, dim))
        q.index_copy_(0, self.places, query.index_select(0, self.tokens))
        q = q.view(self.rows, self.width, heads, dim).transpose(1, 2)  # [rows, heads, width, dim]
        attended = self.kernel(q, k, v, score_mod=self._alibi, block_mask=self.mask, scale=scale,
                               kernel_options=self.options)
        attended = attended.transpose(1, 2).reshape(self.rows * self.width, heads, dim)
        out.index_copy_(0, self.tokens, attended.index_select(0, self.places))


def _blocks(tokens: int, size: int) -> int:
    return -(-tokens // size)


PlanFactory = Callable[[list[Chunk], int, torch.device, int], Any]


def choose(kind: str, kv: Any, device: torch.device, slopes: torch.Tensor, scale: float,
           kernel: Callable[..., torch.Tensor] | None = None) -> tuple[str, PlanFactory]:
    """The attention a paged model uses: ``(name, plan factory)``. ``flex`` is compiled (or ``kernel``)
    and checked against the gathering path on ``kv`` (whose first blocks it writes: nothing is in them
    yet) first; ``auto`` takes it on a GPU when that check passes and keeps ``gather`` otherwise, while
    ``flex`` asked for by name raises."""
    if kind == "gather" or (kind == "auto" and device.type != "cuda"):
        return "gather", AttentionPlan
    factory = functools.partial(FlexPlan, kernel=kernel or compiled_kernel())
    # Every slot a number from the start: the kernel may read slots of blocks no row holds with a weight of
    # zero (inductor's CPU kernel does), and 0 * NaN is NaN. Blocks a failed row leaves are cleared too.
    kv.zero()
    try:
        error = self_check(factory, kv, device, slopes, scale)
    except Exception as exc:  # the kernel does not compile or run here
        error = f"{type(exc).__name__}: {exc}"
    if error is None:
        return "flex", factory
    if kind == "flex":
        raise RuntimeError(f"BLOOMQ_ATTENTION=flex cannot be used on {device}: {error}")
    log.warning("FlexAttention is not used on %s (%s); attention gathers each row's blocks instead", device, error)
    return "gather", AttentionPlan


# How far the kernel's output may be from an fp32 computation of the same scores: fp32 itself; in bf16 or
# fp16, the output's own rounding (bf16 keeps 8 bits: 2**-8 of a value up to ~3) and that of the weights.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def self_check(factory: PlanFactory, kv: Any, device: torch.device, slopes: torch.Tensor, scale: float
               ) -> str | None:
    """Attend two small passes with the kernel on ``kv``'s first layer: None when it matches an fp32
    computation of the same scores, else why.

    The reference is the gathering path run in fp32 on fp32 copies of the same keys, values and queries (the
    pool's own values, widened): in bf16 the gathering path rounds ALiBi's ``slope x position`` to bf16
    (0.125 apart at positions in the tens) while the kernel adds it in fp32, so a bf16 reference would fault a
    kernel that is right. Decode rows of several lengths (two sharing a full block) and a prompt chunk
    starting inside a block, then fewer rows and a wider chunk: the second shapes make the kernel's sizes
    dynamic, so serving does not compile again (run in inference mode, as the engine runs, for the same
    reason)."""
    size = kv.block_size
    fresh = iter(range(kv.num_blocks))

    def row(tokens: int, start: int, shared: list[int] | None = None) -> Chunk:
        held = shared or []
        more = _blocks(start + tokens, size) - len(held)
        return Chunk([1] * tokens, start, held + [next(fresh) for _ in range(more)])

    try:
        first = row(1, size + 2)
        passes = [[first, row(1, 2 * size - 1, first.table[:1]), row(1, 4), row(size + 3, size // 2 + 1)],
                  [row(1, 2 * size, first.table[:1]), row(2 * size + 5, 0)]]
    except StopIteration:
        return f"the KV pool has too few blocks ({kv.num_blocks}) to check it"
    used = (max(max(chunk.table) for chunks in passes for chunk in chunks) + 1) * size  # blocks 0.. in order
    keys, values = kv.keys[0], kv.values[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    tolerance = TOLERANCE.get(keys.dtype, 3e-2)
    with torch.inference_mode():
        for pool in (keys, values):
            pool[:used] = torch.randn((used, *pool.shape[1:]), generator=generator).to(pool.dtype).to(device)
        # The reference's pools: the used slots widened to fp32, then its own null slot (zeros) at ``used``.
        wide = [torch.cat([pool[:used].float(), pool.new_zeros((1, *pool.shape[1:]), dtype=torch.float32)])
                for pool in (keys, values)]
        for chunks in passes:
            tokens = sum(len(chunk.tokens) for chunk in chunks)
            query = torch.randn((tokens, *keys.shape[1:]), generator=generator).to(keys.dtype).to(device)
            expected = AttentionPlan(chunks, used, device, size).attend(query.float(), *wide, slopes.float(), scale)
            plan = factory(chunks, kv.null_slot, device, size)
            if plan.fallback is not None:
                return f"it already failed while serving: {FAILED[0]}"
            got = plan._attend(query, keys, values, slopes, scale)  # the kernel itself: no falling back
            worst = float((got.float() - expected).abs().max())
            if not worst <= tolerance:
                return f"it differs from an fp32 computation of the same scores by {worst:.2g} (at most {tolerance:g})"
        for pool in (keys, values):
            pool[:used].zero_()
    return None

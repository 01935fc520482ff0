"""BLOOM's forward pass over a paged KV cache: rows of any length, decode tokens and prompt chunks, in one pass.

The layers' weights are transformers' own (the loaded ``BloomForCausalLM``); only the way keys and values
are kept and attended to differs from its eager forward:

- every token of the pass, of every row, goes through the embeddings, the projections and the MLP as one
  flat ``[tokens, hidden]`` matrix: no padding, whatever the rows' lengths;
- each layer's keys and values are written straight into their slots of the block pool
  (``PagedKV``: token ``p`` of a row lives at ``table[p // block_size] * block_size + p % block_size``);
- attention reads a row's keys and values through its block table and adds ALiBi, BLOOM's linear bias:
  ``slope[h] * key_position`` (softmax ignores a per-query constant, so this equals the bias on the
  distance), causal within the row. Decode rows (one token each) are attended together; a prompt chunk
  attends to everything before it in its row plus itself, so prefilling in chunks gives what one whole
  prefill gives.

The slopes follow the ALiBi paper, as BLOOM uses them: for ``n`` heads and ``p`` the largest power of two
not above ``n``, head ``i`` (1-based, ``i <= p``) has slope ``2 ** (-8 i / p)``; the heads past ``p`` take
the odd-numbered slopes of ``2p`` heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from worker.faults import GroupLost
from worker.group import PASS_FAILED, PASS_OK, PASS_OUT_OF_MEMORY, STOP
from worker.sharding import Shard, shard_of

T = TypeVar("T")

ALL, LAST, NONE = "all", "last", "none"  # which of a chunk's positions get logits


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (float32), in head order."""
    p = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    slopes += [2 ** (-8 * i / (2 * p)) for i in range(1, 2 * (heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


@dataclass
class Chunk:
    """One row's part of a forward pass: ``tokens`` at positions ``start`` .. ``start + len(tokens) - 1``,
    whose keys/values go into (and are read back from) the blocks of ``table``, which must cover every
    position up to the last one. ``logits``: for ``ALL`` positions, the ``LAST`` one, or ``NONE``."""

    tokens: list[int]
    start: int
    table: list[int]
    logits: str = LAST

    @property
    def end(self) -> int:
        """The position after the chunk's last token (the row's length once it has run)."""
        return self.start + len(self.tokens)


class PagedKV:
    """Every layer's keys and values, in ``num_blocks`` blocks of ``block_size`` slots each, plus one slot
    of zeros that padded reads point at (``null_slot``). The blocks are not initialised: a slot is only
    read after its row wrote it, and memory the load never reaches is never touched."""

    def __init__(self, config: Any, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, shard: Shard | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shard = shard or Shard.of(config)
        heads = shard.heads  # a tensor-parallel rank keeps its own heads only
        head_dim = shard.head_dim
        self.null_slot = num_blocks * block_size
        shape = (self.null_slot + 1, heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        for tensor in (*self.keys, *self.values):
            tensor[self.null_slot].zero_()

    @staticmethod
    def bytes_per_block(config: Any, block_size: int, dtype: torch.dtype, world: int = 1) -> int:
        """Device bytes one block takes across all layers (keys and values), on each of ``world`` ranks."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * (config.hidden_size // world) * itemsize

    def slots(self, chunk: Chunk) -> list[int]:
        """The flat slot of each of ``chunk``'s positions (where its keys and values are written)."""
        size = self.block_size
        return [chunk.table[p // size] * size + p % size for p in range(chunk.start, chunk.end)]


class PagedBloom:
    """Runs ``model`` (a loaded ``BloomForCausalLM``, or one rank's shard of it) over chunks of rows,
    keeping keys/values in ``kv``.

    In a tensor-parallel group (``group``) every rank runs the same pass over its own heads and slices:
    rank 0 calls ``forward`` (which first sends the chunks to the others), the others ``run`` what they
    receive. The partial sums of the row-parallel layers meet in all-reduces and the logits are gathered
    on rank 0. A rank whose part of the pass raises keeps taking part in the collectives with zeros, and
    at the end the group agrees on the outcome: every rank raises (out of memory if that was the cause),
    so the group stays in step and rank 0 handles the failure as it would on one device.
    """

    def __init__(self, model: Any, kv: PagedKV, group: Any = None) -> None:
        self.model = model
        self.kv = kv
        config = model.config
        self.shard = shard_of(model)
        self.heads = self.shard.heads
        self.head_dim = self.shard.head_dim
        self.hidden = config.hidden_size
        self.vocab_size = config.vocab_size
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        # Every head's slope as BLOOM builds them, then this rank's heads.
        start = self.shard.head_start
        self.slopes = alibi_slopes(config.n_head)[start : start + self.heads].to(self.device)
        self.group = group
        self.parallel = group is not None and self.shard.world > 1

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """Run every chunk's tokens through the model (their keys/values are written to the blocks) and
        return, per chunk, float32 logits ``[positions, vocab]`` for the positions it asked for (or None)."""
        if self.parallel:
            self.group.send(chunks)
        return self.run(chunks)

    def idle(self) -> None:
        """Nothing to run for now (rank 0 of a group shows the others it lives)."""
        if self.parallel:
            self.group.ping_if_idle()

    def close(self) -> None:
        """No more passes (the other ranks of a group stop following)."""
        if self.parallel:
            try:
                self.group.send(STOP)
            except GroupLost:
                pass

    def run(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """This process's part of the pass over ``chunks``: the logits on rank 0 (or alone), none elsewhere."""
        tokens = sum(len(chunk.tokens) for chunk in chunks)
        guard = _Guard(self.parallel)
        blank = lambda: torch.zeros((tokens, self.hidden), dtype=self.dtype, device=self.device)  # noqa: E731
        prepared = guard(lambda: self._prepare(chunks), lambda: None)
        ids, slots, plan = prepared if prepared is not None else (None, None, None)
        transformer = self.model.transformer
        x = self._sum(guard(lambda: self._embed(ids), blank))
        x = guard(lambda: transformer.word_embeddings_layernorm(x), blank)
        for index, layer in enumerate(transformer.h):
            x = self._layer(index, layer, x, slots, plan, guard, blank)
        x = guard(lambda: transformer.ln_f(x), blank)
        return self._logits(chunks, x, guard)

    def _prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, _AttentionPlan]:
        ids, slots = [], []
        for chunk in chunks:
            if not chunk.tokens:
                raise ValueError("a chunk needs at least one token")
            ids.extend(chunk.tokens)
            slots.extend(self.kv.slots(chunk))
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        slots_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        return ids_t, slots_t, _AttentionPlan(chunks, self.kv.null_slot, self.device, self.kv.block_size)

    def _sum(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: the sum of every rank's part."""
        return self.group.all_reduce(partial) if self.parallel else partial

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.transformer.word_embeddings
        if not self.parallel:
            return embeddings(ids)
        local = ids - self.shard.vocab_start  # this rank holds a range of the vocabulary
        inside = (local >= 0) & (local < self.shard.vocab_rows)
        found = F.embedding(local.clamp(0, self.shard.vocab_rows - 1), embeddings.weight)
        return found * inside.unsqueeze(1).to(found.dtype)

    def _layer(self, index: int, layer: Any, x: torch.Tensor, slots: Any, plan: Any, guard: _Guard,
               blank: Callable[[], torch.Tensor]) -> torch.Tensor:
        tokens = x.shape[0]
        attention, mlp = layer.self_attention, layer.mlp

        def attend() -> tuple[torch.Tensor, torch.Tensor]:
            normed = layer.input_layernorm(x)
            qkv = attention.query_key_value(normed).view(tokens, self.heads, 3, self.head_dim)
            query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            keys, values = self.kv.keys[index], self.kv.values[index]
            keys.index_copy_(0, slots, key)
            values.index_copy_(0, slots, value)
            context = plan.attend(query, keys, values, self.slopes, self.scale)
            return attention.dense(context.reshape(tokens, -1)), normed if self.post_ln_residual else x

        partial, residual = guard(attend, lambda: (blank(), blank()))
        attended = self._sum(partial) + residual

        def feed_forward() -> tuple[torch.Tensor, torch.Tensor]:
            normed = layer.post_attention_layernorm(attended)
            partial = mlp.dense_4h_to_h(mlp.gelu_impl(mlp.dense_h_to_4h(normed)))
            return partial, normed if self.post_ln_residual else attended

        partial, residual = guard(feed_forward, lambda: (blank(), blank()))
        return self._sum(partial) + residual

    def _logits(self, chunks: list[Chunk], hidden: torch.Tensor, guard: _Guard) -> list[torch.Tensor | None]:
        picks: list[int] = []
        spans: list[tuple[int, int] | None] = []
        offset = 0
        for chunk in chunks:
            count = len(chunk.tokens)
            if chunk.logits == ALL:
                spans.append((len(picks), len(picks) + count))
                picks.extend(range(offset, offset + count))
            elif chunk.logits == LAST:
                spans.append((len(picks), len(picks) + 1))
                picks.append(offset + count - 1)
            else:
                spans.append(None)
            offset += count
        logits: torch.Tensor | None = None
        if picks:
            index = torch.tensor(picks, dtype=torch.long, device=hidden.device)
            rows = self.shard.vocab_rows if self.parallel else self.vocab_size
            logits = guard(lambda: self.model.lm_head(hidden.index_select(0, index)),
                           lambda: torch.zeros((len(picks), rows), dtype=self.dtype, device=self.device))
            if self.parallel:
                logits = self.group.gather_columns(logits, self.vocab_size)
        if self.parallel:
            guard.agree(self.group)
        if logits is None:
            return [None] * len(chunks)
        logits = logits.float()
        return [None if span is None else logits[span[0] : span[1]] for span in spans]


class _Guard:
    """Runs the local parts of a pass. Alone, errors simply propagate. In a group, the first error is
    kept and the rest of the pass runs on zeros (``fallback``), so this rank still meets the others in
    every collective; ``agree`` then makes every rank raise if any rank failed."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.failure: BaseException | None = None

    def __call__(self, part: Callable[[], T], fallback: Callable[[], T]) -> T:
        if not self.parallel:
            return part()
        if self.failure is None:
            try:
                return part()
            except GroupLost:
                raise
            except Exception as exc:  # answered by agree(), on every rank
                self.failure = exc
        return fallback()

    def agree(self, group: Any) -> None:
        failure = self.failure
        status = (PASS_OK if failure is None
                  else PASS_OUT_OF_MEMORY if isinstance(failure, torch.OutOfMemoryError) else PASS_FAILED)
        worst = group.worst(status)
        if worst == PASS_OK:
            return
        said = group.share("" if failure is None else f"{type(failure).__name__}: {failure}")
        detail = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(said) if text)
        if failure is not None:
            raise failure
        if worst == PASS_OUT_OF_MEMORY:
            raise torch.OutOfMemoryError(f"another rank of the group ran out of memory ({detail})")
        raise RuntimeError(f"another rank of the group failed this pass ({detail})")


class _AttentionPlan:
    """How one pass attends, built once per pass and used by every layer.

    - Decode rows (one token each) that share cached prefix blocks (a common system prompt or document)
      are attended as a group: the shared keys and values are read once for the whole group, each row's
      own tail apart, and one softmax spans both (``_SharedGroup``), so a long shared prefix is not
      copied once per row every step.
    - The other decode rows are attended together, padded to the longest context and masked.
    - Each prompt chunk is attended on its own: its queries against its row's whole context, causal.
    """

    def __init__(self, chunks: list[Chunk], null_slot: int, device: torch.device, block_size: int) -> None:
        self.device = device
        offsets, offset = [], 0
        for chunk in chunks:
            offsets.append(offset)
            offset += len(chunk.tokens)
        self.total = offset
        decode = [i for i, chunk in enumerate(chunks) if len(chunk.tokens) == 1]
        self.groups: list[_SharedGroup] = []
        alone: list[int] = []
        for rows, shared in _shared_prefixes([chunks[i] for i in decode], decode, block_size):
            if shared:
                self.groups.append(_SharedGroup(rows, shared * block_size, chunks, offsets, null_slot, device,
                                                block_size))
            else:
                alone.extend(rows)
        alone.sort()
        self.decode_rows = torch.tensor([offsets[i] for i in alone], dtype=torch.long, device=device)
        self.decode_gather: torch.Tensor | None = None
        self.decode_positions: torch.Tensor | None = None
        self.decode_valid: torch.Tensor | None = None
        if alone:
            width = max(chunks[i].end for i in alone)
            self.decode_gather, self.decode_valid = _slot_rows(
                [chunks[i] for i in alone], 0, width, block_size, null_slot, device)
            self.decode_positions = torch.arange(width, device=device, dtype=torch.float32)
        self.prefills = []
        for i, chunk in enumerate(chunks):
            if len(chunk.tokens) == 1:
                continue
            gather = _slot_rows([chunk], 0, chunk.end, block_size, null_slot, device)[0][0]
            queries = torch.arange(chunk.start, chunk.end, device=device)
            keys = torch.arange(chunk.end, device=device)
            causal = keys[None, :] <= queries[:, None]  # [queries, keys]
            self.prefills.append((offsets[i], len(chunk.tokens), gather, causal, keys.float()))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
               scale: float) -> torch.Tensor:
        """``query``: [tokens, heads, dim] for every token of the pass -> attended values, same shape."""
        out = torch.empty_like(query)
        dtype = query.dtype
        if self.decode_gather is not None:
            assert self.decode_valid is not None and self.decode_positions is not None
            k = keys[self.decode_gather].transpose(1, 2)  # [rows, heads, width, dim]
            v = values[self.decode_gather].transpose(1, 2)
            q = query.index_select(0, self.decode_rows).unsqueeze(2)  # [rows, heads, 1, dim]
            bias = slopes[None, :, None] * self.decode_positions[None, None, :]  # [1, heads, width]
            bias = bias.masked_fill(~self.decode_valid[:, None, :], float("-inf")).unsqueeze(2).to(dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            out.index_copy_(0, self.decode_rows, attended.squeeze(2))
        for group in self.groups:
            out.index_copy_(0, group.rows, group.attend(query, keys, values, slopes, scale).to(dtype))
        for offset, count, gather, causal, positions in self.prefills:
            k = keys[gather].transpose(0, 1)  # [heads, context, dim]
            v = values[gather].transpose(0, 1)
            q = query[offset : offset + count].transpose(0, 1)  # [heads, count, dim]
            bias = (slopes[:, None, None] * positions[None, None, :]).expand(-1, count, -1)
            bias = bias.masked_fill(~causal[None], float("-inf")).to(dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            out[offset : offset + count] = attended.transpose(0, 1)
        return out


def _shared_prefixes(chunks: list[Chunk], indexes: list[int], block_size: int) -> list[tuple[list[int], int]]:
    """Decode rows grouped by their first block: (the rows' indexes, how many leading blocks all of them
    hold in common, before each one's newest token). A block id in two tables is a cached, full block."""
    by_first: dict[int, list[int]] = {}
    for chunk, index in zip(chunks, indexes, strict=True):
        by_first.setdefault(chunk.table[0] if chunk.end > block_size else -1 - index, []).append(index)
    position = dict(zip(indexes, chunks, strict=True))
    found = []
    for rows in by_first.values():
        if len(rows) < 2:
            found.append((rows, 0))
            continue
        tables = [position[i].table for i in rows]
        limit = min((position[i].end - 1) // block_size for i in rows)
        shared = 0
        while shared < limit and all(t[shared] == tables[0][shared] for t in tables):
            shared += 1
        found.append((rows, shared))
    return found


class _SharedGroup:
    """Decode rows whose first ``shared`` positions are the same cached blocks: those keys and values are
    gathered once for the group; each row's own positions after them are gathered apart (padded, masked);
    the scores of both parts go through one softmax (float32)."""

    def __init__(self, rows: list[int], shared: int, chunks: list[Chunk], offsets: list[int], null_slot: int,
                 device: torch.device, block_size: int) -> None:
        self.rows = torch.tensor([offsets[i] for i in rows], dtype=torch.long, device=device)
        members = [chunks[i] for i in rows]
        self.shared = _slot_rows(members[:1], 0, shared, block_size, null_slot, device)[0][0]
        width = max(chunk.end for chunk in members) - shared
        self.tail, self.valid = _slot_rows(members, shared, width, block_size, null_slot, device)
        self.shared_positions = torch.arange(shared, device=device, dtype=torch.float32)
        self.tail_positions = torch.arange(shared, shared + width, device=device, dtype=torch.float32)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
               scale: float) -> torch.Tensor:
        q = query.index_select(0, self.rows).float()  # [rows, heads, dim]
        shared_k, shared_v = keys[self.shared].float(), values[self.shared].float()  # [positions, heads, dim]
        tail_k, tail_v = keys[self.tail].float(), values[self.tail].float()  # [rows, positions, heads, dim]
        bias = slopes[None, :, None]
        scores_shared = torch.einsum("rhd,lhd->rhl", q, shared_k) * scale + bias * self.shared_positions
        scores_tail = torch.einsum("rhd,rlhd->rhl", q, tail_k) * scale + bias * self.tail_positions
        scores_tail = scores_tail.masked_fill(~self.valid[:, None, :], float("-inf"))
        weights = torch.cat([scores_shared, scores_tail], dim=-1).softmax(dim=-1)
        split = shared_k.shape[0]
        return (torch.einsum("rhl,lhd->rhd", weights[..., :split], shared_v)
                + torch.einsum("rhl,rlhd->rhd", weights[..., split:], tail_v))


def _slot_rows(chunks: list[Chunk], start: int, width: int, block_size: int, null_slot: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of positions ``start`` .. ``start + width - 1`` of each chunk's row, ``[rows, width]``, the
    null slot past a row's end; and which are real. Worked out on the device from the block tables, so
    the host's work grows with the number of blocks, not of positions."""
    blocks = -(-(start + width) // block_size)
    tables = torch.zeros((len(chunks), blocks), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        held = chunk.table[:blocks]
        tables[row, : len(held)] = torch.tensor(held, dtype=torch.long)
    positions = torch.arange(start, start + width, device=device)
    slots = tables.to(device)[:, positions // block_size] * block_size + positions % block_size
    ends = torch.tensor([chunk.end for chunk in chunks], dtype=torch.long, device=device)
    valid = positions[None, :] < ends[:, None]
    return torch.where(valid, slots, torch.full_like(slots, null_slot)), valid

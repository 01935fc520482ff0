"""Attention over a paged KV cache, with ALiBi: how one pass's rows read their keys and values.

Attention reads a row's keys and values through its block table and adds ALiBi, BLOOM's linear bias:
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

import torch
import torch.nn.functional as F

from worker.engine.chunk import Chunk

# Shared positions from which decode rows are attended as a group. Below it, the rows' own SDPA is faster
# than the group's float32 einsums (the 32-job mix of `make bench`, where rows of one prompt share a few
# blocks of the same greedy text: 5 % of a pass went to the group path, bench/RESULTS.md).
GROUP_MIN_TOKENS = 256


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (float32), in head order."""
    p = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    slopes += [2 ** (-8 * i / (2 * p)) for i in range(1, 2 * (heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class AttentionPlan:
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
            if shared * block_size >= GROUP_MIN_TOKENS:
                self.groups.append(_SharedGroup(rows, shared * block_size, chunks, offsets, null_slot, device,
                                                block_size))
            else:
                alone.extend(rows)
        alone.sort()
        self.decode_rows = torch.tensor([offsets[i] for i in alone], dtype=torch.long, device=device)
        self.decode_gather: torch.Tensor | None = None
        self.decode_positions: torch.Tensor | None = None
        self.decode_valid: torch.Tensor | None = None
        self.decode_bias: torch.Tensor | None = None
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
            k = _read(keys, self.decode_gather).transpose(1, 2)  # [rows, heads, width, dim]
            v = _read(values, self.decode_gather).transpose(1, 2)
            q = query.index_select(0, self.decode_rows).unsqueeze(2)  # [rows, heads, 1, dim]
            if self.decode_bias is None:  # the same for every layer of the pass
                bias = slopes[None, :, None] * self.decode_positions[None, None, :]  # [1, heads, width]
                self.decode_bias = bias.masked_fill(~self.decode_valid[:, None, :], float("-inf")).unsqueeze(2)
            bias = self.decode_bias.to(dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            out.index_copy_(0, self.decode_rows, attended.squeeze(2))
        for group in self.groups:
            out.index_copy_(0, group.rows, group.attend(query, keys, values, slopes, scale).to(dtype))
        for offset, count, gather, causal, positions in self.prefills:
            k = _read(keys, gather).transpose(0, 1)  # [heads, context, dim]
            v = _read(values, gather).transpose(0, 1)
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
        shared_k, shared_v = _read(keys, self.shared).float(), _read(values, self.shared).float()  # [pos, heads, dim]
        tail_k, tail_v = _read(keys, self.tail).float(), _read(values, self.tail).float()  # [rows, pos, heads, dim]
        bias = slopes[None, :, None]
        scores_shared = torch.einsum("rhd,lhd->rhl", q, shared_k) * scale + bias * self.shared_positions
        scores_tail = torch.einsum("rhd,rlhd->rhl", q, tail_k) * scale + bias * self.tail_positions
        scores_tail = scores_tail.masked_fill(~self.valid[:, None, :], float("-inf"))
        weights = torch.cat([scores_shared, scores_tail], dim=-1).softmax(dim=-1)
        split = shared_k.shape[0]
        return (torch.einsum("rhl,lhd->rhd", weights[..., :split], shared_v)
                + torch.einsum("rhl,rlhd->rhd", weights[..., split:], tail_v))


def _read(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The keys or values at ``slots`` (any shape) of a layer's pool: ``[*slots.shape, heads, dim]``. One
    row copy per slot (``index_select``), about twice as fast on a CPU as indexing with a 2-D tensor."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


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

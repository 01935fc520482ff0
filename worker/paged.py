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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
                 device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        heads = config.n_head
        head_dim = config.hidden_size // heads
        self.null_slot = num_blocks * block_size
        shape = (self.null_slot + 1, heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        for tensor in (*self.keys, *self.values):
            tensor[self.null_slot].zero_()

    @staticmethod
    def bytes_per_block(config: Any, block_size: int, dtype: torch.dtype) -> int:
        """Device bytes one block takes across all layers (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * config.hidden_size * itemsize

    def slots(self, chunk: Chunk) -> list[int]:
        """The flat slot of each of ``chunk``'s positions... and of every position before them: 0 .. end-1."""
        size = self.block_size
        return [chunk.table[p // size] * size + p % size for p in range(chunk.end)]


class PagedBloom:
    """Runs ``model`` (a loaded ``BloomForCausalLM``) over chunks of rows, keeping keys/values in ``kv``."""

    def __init__(self, model: Any, kv: PagedKV) -> None:
        self.model = model
        self.kv = kv
        config = model.config
        self.heads = config.n_head
        self.head_dim = config.hidden_size // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.device = model.get_input_embeddings().weight.device
        self.slopes = alibi_slopes(self.heads).to(self.device)

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """Run every chunk's tokens through the model (their keys/values are written to the blocks) and
        return, per chunk, float32 logits ``[positions, vocab]`` for the positions it asked for (or None)."""
        device = self.device
        ids, slots, context = [], [], []
        for chunk in chunks:
            if not chunk.tokens:
                raise ValueError("a chunk needs at least one token")
            row_slots = self.kv.slots(chunk)
            ids.extend(chunk.tokens)
            slots.extend(row_slots[chunk.start :])
            context.append(row_slots)
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        slots_t = torch.tensor(slots, dtype=torch.long, device=device)
        plan = _AttentionPlan(chunks, context, self.kv.null_slot, device)
        transformer = self.model.transformer
        x = transformer.word_embeddings_layernorm(transformer.word_embeddings(ids_t))
        for index, layer in enumerate(transformer.h):
            x = self._layer(index, layer, x, slots_t, plan)
        x = transformer.ln_f(x)
        return self._logits(chunks, x)

    def _layer(self, index: int, layer: Any, x: torch.Tensor, slots: torch.Tensor, plan: _AttentionPlan
               ) -> torch.Tensor:
        tokens = x.shape[0]
        normed = layer.input_layernorm(x)
        residual = normed if self.post_ln_residual else x
        attention = layer.self_attention
        qkv = attention.query_key_value(normed).view(tokens, self.heads, 3, self.head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        keys, values = self.kv.keys[index], self.kv.values[index]
        keys.index_copy_(0, slots, key)
        values.index_copy_(0, slots, value)
        context = plan.attend(query, keys, values, self.slopes, self.scale)
        attended = attention.dense(context.reshape(tokens, -1)) + residual
        normed = layer.post_attention_layernorm(attended)
        residual = normed if self.post_ln_residual else attended
        return layer.mlp(normed.unsqueeze(0), residual.unsqueeze(0)).squeeze(0)

    def _logits(self, chunks: list[Chunk], hidden: torch.Tensor) -> list[torch.Tensor | None]:
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
        if not picks:
            return [None] * len(chunks)
        index = torch.tensor(picks, dtype=torch.long, device=hidden.device)
        logits = self.model.lm_head(hidden.index_select(0, index)).float()
        return [None if span is None else logits[span[0] : span[1]] for span in spans]


class _AttentionPlan:
    """How one pass attends: the decode rows together (padded to the longest context, masked), each prompt
    chunk on its own (its queries against its row's whole context, causal). Built once per pass, used by
    every layer."""

    def __init__(self, chunks: list[Chunk], context: list[list[int]], null_slot: int, device: torch.device) -> None:
        self.device = device
        decode = [i for i, chunk in enumerate(chunks) if len(chunk.tokens) == 1]
        offsets, offset = [], 0
        for chunk in chunks:
            offsets.append(offset)
            offset += len(chunk.tokens)
        self.total = offset
        self.decode_rows = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=device)
        self.decode_gather: torch.Tensor | None = None
        self.decode_positions: torch.Tensor | None = None
        self.decode_valid: torch.Tensor | None = None
        if decode:
            width = max(chunks[i].end for i in decode)
            gather = torch.full((len(decode), width), null_slot, dtype=torch.long)
            valid = torch.zeros((len(decode), width), dtype=torch.bool)
            for row, i in enumerate(decode):
                length = chunks[i].end
                gather[row, :length] = torch.tensor(context[i], dtype=torch.long)
                valid[row, :length] = True
            self.decode_gather = gather.to(device)
            self.decode_valid = valid.to(device)
            self.decode_positions = torch.arange(width, device=device, dtype=torch.float32)
        self.prefills = []
        for i, chunk in enumerate(chunks):
            if len(chunk.tokens) == 1:
                continue
            gather = torch.tensor(context[i], dtype=torch.long, device=device)
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
        for offset, count, gather, causal, positions in self.prefills:
            k = keys[gather].transpose(0, 1)  # [heads, context, dim]
            v = values[gather].transpose(0, 1)
            q = query[offset : offset + count].transpose(0, 1)  # [heads, count, dim]
            bias = (slopes[:, None, None] * positions[None, None, :]).expand(-1, count, -1)
            bias = bias.masked_fill(~causal[None], float("-inf")).to(dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            out[offset : offset + count] = attended.transpose(0, 1)
        return out

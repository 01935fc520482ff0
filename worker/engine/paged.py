"""BLOOM's forward pass over a paged KV cache: rows of any length, decode tokens and prompt chunks, in one pass.

The layers' weights are transformers' own (the loaded ``BloomForCausalLM``); only the way keys and values
are kept and attended to differs from its eager forward:

- every token of the pass, of every row, goes through the embeddings, the projections and the MLP as one
  flat ``[tokens, hidden]`` matrix: no padding, whatever the rows' lengths;
- each layer's keys and values are written straight into their slots of the block pool
  (``PagedKV``: token ``p`` of a row lives at ``table[p // block_size] * block_size + p % block_size``);
- attention reads a row's keys and values through its block table and adds ALiBi (``worker.engine.attention``).

In a tensor-parallel group each rank runs its heads and slices of the same pass; how a failed part still
meets the other ranks is ``worker.model.group.PassGuard``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine import flex
from worker.engine.attention import alibi_slopes
from worker.engine.chunk import ALL, LAST, Chunk
from worker.model.group import STOP, GroupLost, PassGuard
from worker.model.sharding import Shard, shard_of


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

    def zero(self, blocks: list[int] | None = None) -> None:
        """Fill ``blocks`` (None: the whole pool) with zeros in every layer."""
        if blocks is None:
            for tensor in (*self.keys, *self.values):
                tensor.zero_()
            return
        if not blocks:
            return
        size = self.block_size
        device = self.keys[0].device
        slots = (torch.tensor(blocks, device=device)[:, None] * size + torch.arange(size, device=device)).view(-1)
        for tensor in (*self.keys, *self.values):
            tensor.index_fill_(0, slots, 0)

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

    def __init__(self, model: Any, kv: PagedKV, group: Any = None, attention: str | flex.PlanFactory = "gather"
                 ) -> None:
        """``attention``: ``gather``, ``flex`` or ``auto`` (``worker.engine.flex.choose``), or a plan factory."""
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
        if isinstance(attention, str):
            self.attention, self.plan = flex.choose(attention, kv, self.device, self.slopes, self.scale)
        else:
            self.attention, self.plan = getattr(attention, "__name__", "custom"), attention
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
        guard = PassGuard(self.parallel)
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

    def _prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        ids, slots = [], []
        for chunk in chunks:
            if not chunk.tokens:
                raise ValueError("a chunk needs at least one token")
            ids.extend(chunk.tokens)
            slots.extend(self.kv.slots(chunk))
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        slots_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        return ids_t, slots_t, self.plan(chunks, self.kv.null_slot, self.device, self.kv.block_size)

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

    def _layer(self, index: int, layer: Any, x: torch.Tensor, slots: Any, plan: Any, guard: PassGuard,
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

    def _logits(self, chunks: list[Chunk], hidden: torch.Tensor, guard: PassGuard) -> list[torch.Tensor | None]:
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

"""How big the engine is: its batching knobs, the tokens one forward pass may take on a device, and the
blocks its KV pool gets (what fits in the memory left after loading), with the paged model built to that
size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from config.models import ModelSpec
from worker.engine.paged import PagedBloom, PagedKV
from worker.model.loading import LoadedModel
from worker.model.memory import kv_budget_bytes
from worker.model.sharding import shard_of

STEP_TOKENS = {"cuda": 512, "cpu": 128}


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs (see docs/configuration.md)."""

    max_batch_size: int = 32
    max_batch_slots: int | None = None  # KV token slots in the pool; None: derived from free memory
    max_wait_seconds: float = 0.0
    # Tokens one forward pass may take: every decoding row's one, then prompt chunks. None: STEP_TOKENS
    # for the device (a GPU's decode step is bound by memory, so a long chunk costs it little; a CPU's is
    # bound by compute, so a chunk of 512 stalls the decoding rows for several of their steps).
    step_tokens: int | None = None
    block_size: int = 16  # token slots per KV block
    prefix_caching: bool = True
    attention: str = "auto"  # config.values.ATTENTIONS (worker.engine.flex.choose): FlexAttention or gathered rows


def step_tokens(config: EngineConfig, device: torch.device) -> int:
    """Tokens one forward pass may take on ``device``."""
    return config.step_tokens or STEP_TOKENS.get(device.type, 512)


def pool_blocks(loaded: LoadedModel, spec: ModelSpec, config: EngineConfig) -> int:
    """Blocks in the KV pool: ``max_batch_slots`` tokens' worth, or what fits in the memory left (less
    the largest step's activations), at most twice what every row at full length needs (the rest of
    the pool is prefix cache). For one rank of a tensor-parallel group: what fits on this rank."""
    size = config.block_size
    if config.max_batch_slots:
        return max(1, config.max_batch_slots // size)
    model_config = loaded.model.config
    shard = shard_of(loaded.model)
    itemsize = torch.empty((), dtype=loaded.dtype).element_size()
    tokens = step_tokens(config, loaded.device)
    # One pass: the widest attention scores (this rank's heads, a chunk against a full context, float32),
    # the MLP's 4x hidden activations, and the logits kept (a row each, or a prompt-details chunk).
    activations = (shard.heads * tokens * spec.max_total_tokens * 4
                   + tokens * model_config.hidden_size * 8 * itemsize
                   + max(config.max_batch_size, tokens) * model_config.vocab_size * 4)
    per_block = PagedKV.bytes_per_block(model_config, size, loaded.dtype, shard.world)
    fits = (kv_budget_bytes(loaded.device) - activations) // per_block
    useful = 2 * config.max_batch_size * -(-spec.max_total_tokens // size)
    return max(1, min(int(fits), useful))


def paged_model(loaded: LoadedModel, spec: ModelSpec, config: EngineConfig, group: Any = None
                ) -> tuple[PagedKV, PagedBloom]:
    """The KV pool and the paged forward of ``loaded``. In a tensor-parallel group every rank calls
    this at start-up: the pool gets the number of blocks that fits on every rank."""
    blocks = pool_blocks(loaded, spec, config)
    if group is not None:
        blocks = group.smallest(blocks)
    kv = PagedKV(loaded.model.config, blocks, config.block_size, loaded.dtype, loaded.device,
                 shard_of(loaded.model))
    return kv, PagedBloom(loaded.model, kv, group, config.attention)

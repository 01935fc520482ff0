"""Live-worker announcements: each worker refreshes a short-lived record in Redis while it runs."""

from __future__ import annotations

from datetime import datetime

import redis
from pydantic import BaseModel, Field

from jobs.schema import utcnow

WORKER_SET = "bloomq:workers"
WORKER_KEY_PREFIX = "bloomq:worker:"


class WorkerInfo(BaseModel):
    """What a worker says about itself."""

    name: str = Field(description="Node name: model@host.devices")
    instance: str = Field(description="This process start: name, pid and a random boot id. A restarted worker "
                                      "is a new instance, even with the same name and pid.")
    model: str
    source: str = Field("", description="Where it loaded the model from (hub id or directory).")
    max_input_tokens: int = Field(0, description="The model's prompt limit (0: not announced).")
    max_total_tokens: int = Field(0, description="The model's prompt + new tokens limit (0: not announced).")
    host: str
    device: str
    dtype: str
    dtype_reason: str = Field("", description="Why this dtype: as configured, or what the auto policy found "
                                              "(a CPU's native bf16 instructions, a GPU's bf16 support).")
    pid: int
    devices: list[str] = Field(default_factory=list, description="GPU indexes this worker uses (empty: CPU).")
    tensor_parallel: int = Field(1, description="Processes (one per GPU) the model is split across.")
    quantization: str = Field("none", description="Weight-only quantization of the linear layers.")
    attention: str = Field("gather", description="How attention reads the paged KV cache: flex (FlexAttention "
                                                 "over the blocks in place) or gather (each row's blocks "
                                                 "copied out for SDPA).")
    weights_bytes: list[int] = Field(default_factory=list,
                                     description="Bytes of weights each rank holds (one entry without tensor "
                                                 "parallelism).")
    load_peak_bytes: list[int] = Field(default_factory=list,
                                       description="Each rank's rise in resident host memory while loading "
                                                   "(sharded loading reads only the rank's slices).")
    batch_capacity: int = Field(1, description="How many jobs this worker runs at once.")
    jobs_running: int = Field(0, description="Jobs in its batch or waiting in its engine, at the last heartbeat.")
    restarts: int = Field(0, description="Times its launcher restarted this worker after it died.")
    prefills: int = Field(0, description="Passes that read prompt tokens (prompt chunks) since it started.")
    kv_blocks: int = Field(0, description="Blocks in its paged KV pool (0: not announced).")
    kv_block_tokens: int = Field(0, description="Token slots per KV block.")
    kv_blocks_in_use: int = Field(0, description="KV blocks held by running jobs, at the last heartbeat.")
    kv_blocks_cached: int = Field(0, description="KV blocks whose content is in the prefix index (held or idle).")
    prompt_tokens_reused: int = Field(0, description="Prompt tokens taken from the prefix cache since it started.")
    prompt_tokens_computed: int = Field(0, description="Prompt tokens computed since it started.")
    memory_bytes: int = Field(0, description="Device memory in use (GPU), or resident memory (CPU).")
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)


class WorkerDirectory:
    """Announce workers and list the live ones."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def announce(self, info: WorkerInfo, ttl_seconds: float) -> None:
        """Record ``info`` as live for ``ttl_seconds``."""
        info = info.model_copy(update={"last_seen": utcnow()})
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(WORKER_KEY_PREFIX + info.instance, info.model_dump_json(), px=int(ttl_seconds * 1000))
        pipe.sadd(WORKER_SET, info.instance)
        pipe.execute()

    def withdraw(self, instance: str) -> None:
        """Remove a worker's record at once (clean shutdown)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(WORKER_KEY_PREFIX + instance)
        pipe.srem(WORKER_SET, instance)
        pipe.execute()

    def live(self) -> list[WorkerInfo]:
        """Workers whose record has not expired; expired names are pruned from the set."""
        names = sorted(n.decode() for n in self.redis.smembers(WORKER_SET))  # instances
        if not names:
            return []
        raws = self.redis.mget([WORKER_KEY_PREFIX + n for n in names])
        dead = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if dead:
            self.redis.srem(WORKER_SET, *dead)
        return [WorkerInfo.model_validate_json(raw) for raw in raws if raw is not None]

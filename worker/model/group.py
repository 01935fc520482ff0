"""A tensor-parallel worker group: N processes, one per GPU (or CPU ranks with gloo), one model split
across them (``worker.model.sharding``).

Rank 0 is the group's only Celery consumer, scheduler and sampler. Every forward pass starts with rank 0
sending the other ranks what to run (the pass's chunks: tokens, positions, block tables, which logits);
they run the same pass over their heads, the partial sums meet in all-reduces, and the logits are
gathered on rank 0. The block pool and the prefix index live on rank 0 only: the other ranks write their
heads' keys and values to whatever slots rank 0's tables name. A rank whose part of a pass raises still
meets the others in every collective (``PassGuard``), and at the end the group agrees on the outcome.

Nothing waits forever: the group's collectives time out (``BLOOMQ_GROUP_TIMEOUT``), rank 0 pings the
others while idle, and a lost rank or leader turns into ``GroupLost`` (a fatal device fault for rank 0,
which hands its jobs back and exits; an exit for the others). The launcher then restarts the whole group.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from worker.model.memory import free_device_memory

log = logging.getLogger(__name__)
T = TypeVar("T")


class GroupLost(RuntimeError):
    """A rank of a tensor-parallel group is gone or stopped answering: the group cannot run another pass
    (fatal, like a broken device: the group restarts)."""


PING_SECONDS = 2.0  # rank 0 sends an empty message this often while idle, so the others know it lives
STOP = "stop"
PING = "ping"
PASS_OK, PASS_OUT_OF_MEMORY, PASS_FAILED = 0, 1, 2  # how a rank's part of a pass went (the group takes the worst)


@dataclass(frozen=True)
class GroupEnv:
    """A process's place in its group, from the torch.distributed environment the launcher sets."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GroupEnv:
        env = dict(os.environ) if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        return cls(rank=rank, world=world, local_rank=int(env.get("LOCAL_RANK", str(rank))))


class Group:
    """The collectives a sharded forward pass needs, and rank 0's messages to the others.

    Created after the model is loaded (loading may take minutes and differ between ranks): the process
    group is joined with ``setup_timeout``; the groups the passes use then time out after ``timeout``.
    Control messages always go over gloo (host memory), the tensors over NCCL on GPUs.
    """

    def __init__(self, env: GroupEnv, device: torch.device, timeout: float, setup_timeout: float = 3600.0) -> None:
        self.rank = env.rank
        self.world = env.world
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            if not dist.is_initialized():
                dist.init_process_group(backend, rank=env.rank, world_size=env.world,
                                        timeout=timedelta(seconds=setup_timeout))
            self.compute = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout))
            self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        except Exception as exc:
            raise GroupLost(f"rank {env.rank} of {env.world} could not join its group: {exc}") from exc
        self.last_sent = time.monotonic()

    @property
    def leads(self) -> bool:
        return self.rank == 0

    # -- tensors ----------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """The sum (or ``op``) of ``tensor`` over the ranks, in place."""
        try:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.compute)
        except Exception as exc:
            raise GroupLost(f"a rank of the group is gone ({type(exc).__name__}: {exc})") from exc
        return tensor

    def gather_columns(self, part: torch.Tensor, width: int) -> torch.Tensor | None:
        """Every rank's ``part`` side by side (columns), cut to ``width``, on rank 0; None elsewhere."""
        parts = [torch.empty_like(part) for _ in range(self.world)] if self.leads else None
        try:
            dist.gather(part.contiguous(), parts, dst=0, group=self.compute)
        except Exception as exc:
            raise GroupLost(f"a rank of the group is gone ({type(exc).__name__}: {exc})") from exc
        return torch.cat(parts, dim=-1)[..., :width] if parts is not None else None

    def worst(self, status: int) -> int:
        """The highest ``status`` any rank reports."""
        flag = torch.tensor([status], dtype=torch.int32, device=self.device)
        return int(self.all_reduce(flag, dist.ReduceOp.MAX).item())

    def smallest(self, value: int) -> int:
        """The smallest ``value`` any rank has (e.g. how many KV blocks fit)."""
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(flag, dist.ReduceOp.MIN).item())

    def share(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (at start-up, or to say which rank failed a pass and how)."""
        values: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(values, value, group=self.control)
        except Exception as exc:
            raise GroupLost(f"a rank of the group is gone ({type(exc).__name__}: {exc})") from exc
        return values

    # -- rank 0's messages ------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Rank 0: tell the other ranks what comes next (a pass's chunks, ``PING`` or ``STOP``)."""
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except Exception as exc:
            raise GroupLost(f"a rank of the group is gone ({type(exc).__name__}: {exc})") from exc
        self.last_sent = time.monotonic()

    def receive(self) -> Any:
        """The other ranks: wait for rank 0's next message."""
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except Exception as exc:
            raise GroupLost(f"rank 0 of the group is gone ({type(exc).__name__}: {exc})") from exc
        return box[0]

    def ping_if_idle(self) -> None:
        """Rank 0, while it has nothing to run: a sign of life now and then."""
        if time.monotonic() - self.last_sent >= PING_SECONDS:
            self.send(PING)

    def close(self) -> None:
        """Leave the process group (after ``STOP``)."""
        try:
            dist.destroy_process_group()
        except Exception:  # already gone with a lost rank: nothing left to release
            pass


class PassGuard:
    """Runs the local parts of a pass. Alone, errors simply propagate. In a group, the first error is
    kept and the rest of the pass runs on zeros (``fallback``), so this rank still meets the others in
    every collective; ``agree`` then makes every rank raise if any rank failed."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.failure: BaseException | None = None

    def __call__(self, part: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``part()``; in a group, after a failure (this one's or an earlier part's): ``fallback()``."""
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

    def agree(self, group: Group) -> None:
        """Every rank raises if any rank's part of the pass failed (out of memory if that was the cause)."""
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


def follow(paged: Any, group: Group) -> None:
    """Ranks other than 0: run each pass rank 0 sends until it says ``STOP``. A pass that fails was
    agreed on by the whole group (rank 0 decides what to do about it); a lost leader raises ``GroupLost``."""
    with torch.inference_mode():
        while True:
            message = group.receive()
            if message == STOP:
                return
            if message == PING:
                continue
            try:
                paged.run(message)
            except GroupLost:
                raise
            except torch.OutOfMemoryError:
                free_device_memory(group.device)
            except Exception as exc:  # the group knows; rank 0 retries or fails the rows
                log.debug("a pass failed on rank %d: %s", group.rank, exc)

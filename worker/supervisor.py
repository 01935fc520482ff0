"""Supervision of the worker processes: start each planned worker (every rank of a tensor-parallel group,
with its own ``CUDA_VISIBLE_DEVICES`` and the torch.distributed environment), restart one that dies, and
drain them all on a signal.

Each child gets ``CUDA_VISIBLE_DEVICES`` before it imports torch, so it sees exactly its own GPU (a
group's ranks see the group's GPUs, each taking the one at its rank) and never forks after touching CUDA.
A group's ranks also get ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (a
free port for each start). A worker (or any rank of a group) that dies brings its whole group down and it
is restarted with a growing backoff (1 s, 2 s, 4 s … 60 s); one that exits before it ever got ready (e.g.
the model does not load) stops the supervisor with its status. SIGTERM/SIGINT drain: each worker (a
group's rank 0, which then stops its other ranks) finishes its running jobs, hands back the ones it had
not started, and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

READY_FILE_ENV = "BLOOMQ_READY_FILE"  # set by the launcher: the child touches it once it consumes its queue
RESTARTS_ENV = "BLOOMQ_WORKER_RESTARTS"  # set for each process: how often its launcher restarted it
MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0  # a child that ran this long has its restart backoff reset
GROUP_GRACE = 15.0  # after one rank of a group dies, the others get this long to notice and exit on their own


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process to start."""

    name: str
    cuda_visible_devices: str | None  # None: a CPU worker
    ranks: int = 1  # processes in its tensor-parallel group (1: a plain worker)

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda``: what the process is told to run on."""
        return "cpu" if self.cuda_visible_devices is None else "cuda"


@dataclass
class Child:
    """One supervised worker: a process, or the processes of a tensor-parallel group (rank 0 first)."""

    plan: WorkerPlan
    ready_file: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_at: float = 0.0
    restarts: int = 0  # restarts in a row (the backoff's exponent; reset once it ran stably)
    starts: int = 0  # times it was started in all
    restart_at: float | None = None
    ever_ready: bool = False
    failed_at: float | None = None  # when a member was first seen dead (the group is going down)
    status: int = 0  # the first member's exit status

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The worker process (a group's rank 0: the one that consumes the queue)."""
        return self.procs[0] if self.procs else None

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.procs if proc.poll() is None]


def free_port() -> int:
    """A TCP port nothing listens on now (a group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Supervisor:
    """Starts the planned workers, restarts the ones that die (a group as a whole), drains them all on a
    signal."""

    def __init__(
        self,
        plan: list[WorkerPlan],
        ref: str,
        state_dir: Path,
        command: Callable[[WorkerPlan], list[str]] | None = None,
    ) -> None:
        self.ref = ref
        self.children = [Child(item, state_dir / f"{item.name}.ready") for item in plan]
        self.command = command or self.serve_command
        self.stopping = False
        self.group_grace = GROUP_GRACE

    def serve_command(self, plan: WorkerPlan) -> list[str]:
        """The worker process for ``plan`` (every rank of a group runs it; the rank comes from ``RANK``)."""
        return [sys.executable, "-m", "worker.serve", "--model", self.ref, "--device", plan.device,
                "--name", plan.name]

    def start(self, child: Child) -> None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = child.plan.cuda_visible_devices or ""
        env[READY_FILE_ENV] = str(child.ready_file)
        env[RESTARTS_ENV] = str(child.starts)  # how often it was started before: the worker announces it
        child.starts += 1
        child.ready_file.unlink(missing_ok=True)
        ranks = child.plan.ranks
        if ranks > 1:
            env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        child.procs = []
        for rank in range(ranks):
            if ranks > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank))
            child.procs.append(subprocess.Popen(self.command(child.plan), env=dict(env)))
        child.started_at = time.monotonic()
        child.restart_at = None
        child.failed_at = None

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            # A group's rank 0 drains and then stops its other ranks itself.
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Drain: pass ``signum`` to every worker and restart none. Celery's warm shutdown finishes the
        running jobs and gives back the ones not started; a second SIGINT means "stop now" to Celery."""
        self.stopping = True
        self.signal_all(signum)

    def run(self, install_signals: bool = True) -> int:
        """Supervise until every child has exited after a stop, or one fails to ever get ready."""
        if install_signals:
            signal.signal(signal.SIGINT, lambda signum, _frame: self.stop(signum))
            signal.signal(signal.SIGTERM, lambda signum, _frame: self.stop(signum))
        for child in self.children:
            self.start(child)
        status = 0
        while True:
            now = time.monotonic()
            for child in self.children:
                child.ever_ready = child.ever_ready or child.ready_file.exists()
                if child.restart_at is not None:  # dead, waiting out its backoff
                    if not self.stopping and now >= child.restart_at:
                        self.start(child)
                    continue
                if not self._gone(child, now):
                    continue
                if self.stopping:
                    continue
                code = child.status
                if not child.ever_ready:
                    # It never got as far as consuming its queue (the model did not load, say): restarting
                    # would only repeat the error. Stop everything and pass the status on.
                    print(f"[launcher] {child.plan.name} exited with status {code} before it was ready; "
                          "stopping", file=sys.stderr, flush=True)
                    status = code if code > 0 else 1
                    self.stopping = True
                    self.signal_all(signal.SIGTERM)
                    continue
                if now - child.started_at >= STABLE_AFTER:
                    child.restarts = 0
                delay = min(MAX_BACKOFF, 2.0**child.restarts)
                child.restarts += 1
                child.restart_at = now + delay
                what = "a rank of the group" if child.plan.ranks > 1 else "it"
                print(f"[launcher] {child.plan.name}: {what} died with status {code}; restarting in {delay:.0f}s",
                      file=sys.stderr, flush=True)
            if self.stopping and all(not c.alive() or self._gone(c, now) for c in self.children):
                return status
            time.sleep(0.2)

    def _gone(self, child: Child, now: float) -> bool:
        """Whether every process of ``child`` has exited. Once one has, the others get ``GROUP_GRACE`` to
        follow on their own (rank 0 hands its jobs back first), then are killed."""
        if not child.procs:
            return True
        alive = child.alive()
        if len(alive) == len(child.procs):
            return False
        if child.failed_at is None:
            child.failed_at = now
            child.status = next(proc.returncode for proc in child.procs if proc.poll() is not None)
        if alive and now - child.failed_at >= self.group_grace:
            for proc in alive:
                proc.kill()
        return not alive


def run_plan(plan: list[WorkerPlan], ref: str) -> int:
    """Start the planned processes and supervise them until a stop signal (or a fatal start failure)."""
    with tempfile.TemporaryDirectory(prefix="bloomq-launcher-") as state_dir:
        return Supervisor(plan, ref, Path(state_dir)).run()

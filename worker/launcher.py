"""The launcher: one worker process per GPU (one CPU worker without GPUs).

    python -m worker [--model REF] [--gpus all|none|0,1,3] [--dry-run]

Each child gets ``CUDA_VISIBLE_DEVICES`` before it imports torch, so it sees exactly its own GPU and
never forks after touching CUDA. The launcher supervises its children: one that dies is restarted with
a growing backoff (1 s, 2 s, 4 s … 60 s); one that exits before it ever got ready (e.g. the model does not
load) stops the launcher with its status. SIGTERM/SIGINT drain: each child finishes its running jobs,
hands back the ones it had not started, and exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.models import resolve_model
from config.settings import Settings


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process to start."""

    name: str
    cuda_visible_devices: str | None  # None: a CPU worker

    @property
    def device(self) -> str:
        return "cpu" if self.cuda_visible_devices is None else "cuda"


class PlanError(ValueError):
    """The requested GPUs cannot be served on this machine."""


def plan_workers(model: str, host: str, gpu_ids: list[str], gpus: str, per_worker: int = 1) -> list[WorkerPlan]:
    """Pure planning: which processes to start for ``gpus`` given the GPUs this machine has.

    One process per GPU, or per group of ``per_worker`` GPUs for a model larger than one card (the
    process then spreads the model over its group with ``device_map``).
    """
    if per_worker < 1:
        raise PlanError(f"--gpus-per-worker {per_worker}: must be at least 1")
    if gpus == "none" or (gpus == "all" and not gpu_ids):
        return [WorkerPlan(name=f"{model}@{host}.cpu", cuda_visible_devices=None)]
    if gpus == "all":
        chosen = gpu_ids
    else:
        chosen = [part.strip() for part in gpus.split(",") if part.strip()]
        if not chosen:
            raise PlanError(f"--gpus {gpus!r}: give all, none or a comma-separated list of GPU indexes")
        missing = [g for g in chosen if g not in gpu_ids]
        if missing:
            have = ", ".join(gpu_ids) or "none"
            raise PlanError(f"--gpus {gpus!r}: GPU {', '.join(missing)} does not exist here (GPUs: {have})")
        if len(set(chosen)) != len(chosen):
            raise PlanError(f"--gpus {gpus!r}: a GPU is listed twice")
    if len(chosen) % per_worker:
        raise PlanError(
            f"--gpus-per-worker {per_worker}: {len(chosen)} GPU(s) ({', '.join(chosen)}) do not split into "
            f"groups of {per_worker}"
        )
    groups = [chosen[i : i + per_worker] for i in range(0, len(chosen), per_worker)]
    return [
        WorkerPlan(name=f"{model}@{host}.gpu{'+'.join(group)}", cuda_visible_devices=",".join(group))
        for group in groups
    ]


def visible_gpus() -> list[str]:
    """GPU indexes this machine offers, without importing torch (which must not touch CUDA here)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Start bloomq worker processes.")
    parser.add_argument("--model", help="registry name, hub id or local directory (default: BLOOMQ_MODEL)")
    parser.add_argument("--gpus", default="all", help="all (default), none, or GPU indexes like 0,1,3")
    parser.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                        help="GPUs per process, for a model larger than one card (default 1)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="override the dtype policy for this model (default: BLOOMQ_DTYPE, else auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    ref = args.model or settings.model
    if args.dtype:
        os.environ["BLOOMQ_DTYPE"] = args.dtype  # the children read it
    try:
        spec = resolve_model(ref)
        plan = plan_workers(spec.name, settings.host_name, visible_gpus(), args.gpus, args.gpus_per_worker)
    except (PlanError, ValueError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        policy = args.dtype or settings.dtype
        for item in plan:
            dtype = describe_dtype(item, policy if policy != "auto" else spec.dtype)
            print(f"{item.name}: devices={item.cuda_visible_devices or 'cpu'} queue={spec.queue} dtype={dtype}")
        return 0
    return run_plan(plan, ref)


def describe_dtype(item: WorkerPlan, policy: str) -> str:
    """The dtype a process will load with (the GPU's bf16 support is known only once it starts)."""
    if policy != "auto":
        return policy
    return "float32" if item.cuda_visible_devices is None else "bfloat16 (float16 on GPUs without bf16)"


READY_FILE_ENV = "BLOOMQ_READY_FILE"  # set by the launcher: the child touches it once it consumes its queue
MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0  # a child that ran this long has its restart backoff reset


@dataclass
class Child:
    """One supervised worker process."""

    plan: WorkerPlan
    ready_file: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    ever_ready: bool = False


class Supervisor:
    """Starts the planned worker processes, restarts the ones that die, drains them all on a signal."""

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

    def serve_command(self, plan: WorkerPlan) -> list[str]:
        """The worker process for ``plan``."""
        return [sys.executable, "-m", "worker.serve", "--model", self.ref, "--device", plan.device,
                "--name", plan.name]

    def start(self, child: Child) -> None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = child.plan.cuda_visible_devices or ""
        env[READY_FILE_ENV] = str(child.ready_file)
        child.ready_file.unlink(missing_ok=True)
        child.proc = subprocess.Popen(self.command(child.plan), env=env)
        child.started_at = time.monotonic()
        child.restart_at = None

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Drain: pass ``signum`` to every child and restart none. Celery's warm shutdown finishes the
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
                code = child.proc.poll() if child.proc is not None else None
                if code is None or self.stopping:
                    continue
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
                print(f"[launcher] {child.plan.name} died with status {code}; restarting in {delay:.0f}s",
                      file=sys.stderr, flush=True)
            if self.stopping and all(c.proc is None or c.proc.poll() is not None for c in self.children):
                return status
            time.sleep(0.2)


def run_plan(plan: list[WorkerPlan], ref: str) -> int:
    """Start the planned processes and supervise them until a stop signal (or a fatal start failure)."""
    with tempfile.TemporaryDirectory(prefix="bloomq-launcher-") as state_dir:
        return Supervisor(plan, ref, Path(state_dir)).run()

"""The launcher: one worker process per GPU (one CPU worker without GPUs).

    python -m worker [--model REF] [--gpus all|none|0,1,3] [--dry-run]

Each child gets ``CUDA_VISIBLE_DEVICES`` before it imports torch, so it sees exactly its own GPU and
never forks after touching CUDA. The launcher forwards SIGINT/SIGTERM to its children and exits with the
first non-zero status a child returns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from config.models import model_name
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


def plan_workers(model: str, host: str, gpu_ids: list[str], gpus: str) -> list[WorkerPlan]:
    """Pure planning: which processes to start for ``gpus`` given the GPUs this machine has."""
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
    return [WorkerPlan(name=f"{model}@{host}.gpu{g}", cuda_visible_devices=g) for g in chosen]


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
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    ref = args.model or settings.model
    try:
        plan = plan_workers(model_name(ref), socket.gethostname(), visible_gpus(), args.gpus)
    except (PlanError, ValueError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        for item in plan:
            print(f"{item.name}: device={item.device} CUDA_VISIBLE_DEVICES={item.cuda_visible_devices or '-'}")
        return 0
    return run_plan(plan, ref)


def run_plan(plan: list[WorkerPlan], ref: str) -> int:
    """Start the planned processes and wait; stop them all when one fails or on a signal."""
    children: list[subprocess.Popen[bytes]] = []
    for item in plan:
        env = dict(os.environ)
        if item.cuda_visible_devices is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env["CUDA_VISIBLE_DEVICES"] = item.cuda_visible_devices
        cmd = [sys.executable, "-m", "worker.serve", "--model", ref, "--device", item.device, "--name", item.name]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    while any(child.poll() is None for child in children):
        for child in children:
            code = child.poll()
            if code not in (None, 0) and status == 0:
                status = code
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    for child in children:
        if child.returncode not in (None, 0) and status == 0:
            status = child.returncode
    return 1 if status < 0 else status

"""The launcher: one worker process per GPU (one CPU worker without GPUs), or one tensor-parallel group
of N processes per N GPUs.

    python -m worker [--model REF] [--gpus all|none|0,1,3] [--tensor-parallel N] [--quantize int8|int4]
                     [--dry-run] [--plan [--gpus-spec 8xA100-80GB]]

The command line and the plan: which processes to start on this machine's GPUs, refusing before anything
loads a placement that cannot fit (``worker.model.planner``). Starting, restarting and draining them is
``worker.supervisor``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

from config.models import ModelSpec, resolve_model
from config.settings import Settings
from config.values import QUANTIZATIONS
from worker.model.planner import (
    Gpu,
    PlacementError,
    choose,
    gpu_from_memory,
    options,
    parse_gpus,
    refusal,
    shape_of,
)
from worker.model.planner import table as planning_table
from worker.model.precision import cpu_dtype
from worker.supervisor import WorkerPlan, run_plan


class PlanError(ValueError):
    """The requested GPUs cannot be served on this machine."""


def plan_workers(model: str, host: str, gpu_ids: list[str], gpus: str, per_worker: int = 1,
                 tensor_parallel: int = 1) -> list[WorkerPlan]:
    """Pure planning: which processes to start for ``gpus`` given the GPUs this machine has.

    One process per GPU; or one tensor-parallel group of ``tensor_parallel`` processes per that many
    GPUs (without GPUs: one group of CPU ranks); or one process per ``per_worker`` GPUs that spreads the
    model's layers over them with ``device_map`` (one GPU works at a time: tensor parallelism is faster).
    """
    if per_worker < 1:
        raise PlanError(f"--gpus-per-worker {per_worker}: must be at least 1")
    if tensor_parallel < 1:
        raise PlanError(f"--tensor-parallel {tensor_parallel}: must be at least 1")
    if tensor_parallel > 1 and per_worker > 1:
        raise PlanError("--tensor-parallel and --gpus-per-worker are two ways to use several GPUs per model: "
                        "choose one")
    if gpus == "none" or (gpus == "all" and not gpu_ids):
        return [WorkerPlan(name=f"{model}@{host}.cpu", cuda_visible_devices=None, ranks=tensor_parallel)]
    group = max(per_worker, tensor_parallel)
    flag = "--tensor-parallel" if tensor_parallel > 1 else "--gpus-per-worker"
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
    if len(chosen) % group:
        raise PlanError(
            f"{flag} {group}: {len(chosen)} GPU(s) ({', '.join(chosen)}) do not split into groups of {group}"
        )
    groups = [chosen[i : i + group] for i in range(0, len(chosen), group)]
    return [
        WorkerPlan(name=f"{model}@{host}.gpu{'+'.join(ids)}", cuda_visible_devices=",".join(ids),
                   ranks=tensor_parallel)
        for ids in groups
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


def gpu_cards() -> list[Gpu]:
    """The cards this machine offers, by nvidia-smi (name and memory), in index order; [] without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    cards = []
    for line in out.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            cards.append(gpu_from_memory(name.strip(), int(mib) * 2**20))
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Start bloomq worker processes.")
    parser.add_argument("--model", help="registry name, hub id or local directory (default: BLOOMQ_MODEL)")
    parser.add_argument("--gpus", default="all", help="all (default), none, or GPU indexes like 0,1,3")
    parser.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="split the model across groups of N processes, one per GPU (without GPUs: N CPU "
                             "ranks); default: BLOOMQ_TENSOR_PARALLEL, else 1")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="weight-only quantization of the linear layers (default: BLOOMQ_QUANTIZE, else none)")
    parser.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                        help="GPUs per process, the model's layers spread over them (one works at a time; "
                             "--tensor-parallel is faster)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="override the dtype policy for this model (default: BLOOMQ_DTYPE, else auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print where the model fits on these GPUs (or --gpus-spec's) and exit")
    parser.add_argument("--gpus-spec", metavar="NxCARD", help="plan for other GPUs, e.g. 8xA100-80GB or 2xH200")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    ref = args.model or settings.model
    tensor_parallel = args.tensor_parallel or settings.tensor_parallel
    quantization = args.quantize or settings.quantize
    if args.dtype:
        os.environ["BLOOMQ_DTYPE"] = args.dtype  # the children read it
    os.environ["BLOOMQ_QUANTIZE"] = quantization
    try:
        spec = resolve_model(ref)
        if args.plan or args.gpus_spec:
            return print_plan(spec, args.gpus_spec)
        plan = plan_workers(spec.name, settings.host_name, visible_gpus(), args.gpus, args.gpus_per_worker,
                            tensor_parallel)
        check_fits(spec, plan, quantization)
    except (PlanError, PlacementError, ValueError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        policy = args.dtype or settings.dtype
        for item in plan:
            dtype = describe_dtype(item, policy if policy != "auto" else spec.dtype)
            print(f"{item.name}: devices={item.cuda_visible_devices or 'cpu'} queue={spec.queue} dtype={dtype} "
                  f"tensor_parallel={item.ranks} quantize={quantization}")
        return 0
    return run_plan(plan, ref)


def print_plan(spec: ModelSpec, gpus_spec: str | None) -> int:
    """``--plan``: the placements on ``gpus_spec`` (or this machine's GPUs); 0 when one fits, 1 if not."""
    shape = shape_of(spec)
    if shape is None:
        raise PlacementError(f"the shape of {spec.source!r} is unknown: plan with a registry name (e.g. bloom) or "
                             "a local checkpoint directory")
    if gpus_spec:
        count, card = parse_gpus(gpus_spec)
    else:
        cards = gpu_cards()
        if not cards:
            raise PlacementError("no GPU visible here: give --gpus-spec, e.g. --gpus-spec 8xA100-80GB")
        count, card = len(cards), min(cards, key=lambda c: c.memory_bytes)
    text = planning_table(spec.name, shape, spec.max_total_tokens, count, card)
    print(text)
    return 1 if "\nrefused:" in text else 0


def check_fits(spec: ModelSpec, plan: list[WorkerPlan], quantization: str) -> None:
    """Refuse, before anything loads, a placement that cannot fit on this machine's GPUs (when the model's
    shape and the cards are known)."""
    shape = shape_of(spec)
    ranks = plan[0].ranks if plan else 1
    if shape is not None and shape.n_head % ranks:
        raise PlacementError(f"{spec.name} has {shape.n_head} attention heads, which do not divide into a "
                             f"tensor-parallel size of {ranks}")
    cards = gpu_cards()
    if shape is None or not cards or not plan or plan[0].cuda_visible_devices is None:
        return
    card = min(cards, key=lambda c: c.memory_bytes)
    reason = refusal(shape, spec.max_total_tokens, len(cards), card, quantization, ranks)
    if reason is not None:
        try:
            chosen = choose(options(shape, spec.max_total_tokens, len(cards), card))
            hint = (f"; on these GPUs: --tensor-parallel {chosen.tensor_parallel} --quantize "
                    f"{chosen.quantization} (python -m worker --plan)")
        except PlacementError as exc:
            hint = f"; nothing fits on these GPUs ({exc})"
        raise PlacementError(f"{spec.name} does not fit: {reason}{hint}")


def describe_dtype(item: WorkerPlan, policy: str) -> str:
    """The dtype a process will load with, and why (the GPU's bf16 support is known only once it starts)."""
    if item.cuda_visible_devices is None:
        choice = cpu_dtype(policy)
        return f"{choice.name} ({choice.reason})"
    if policy != "auto":
        return policy
    return "bfloat16 (float16 on GPUs without bf16)"

"""Where a BLOOM fits: for a set of GPUs, each placement (dtype, quantization, tensor-parallel size) with
its weights per GPU, the KV cache left and the batch that fits at the model's full length, and the one the
launcher chooses. Pure arithmetic on the model's shape and the cards' memory: nothing is loaded.

    python -m worker --model bloom --plan [--gpus-spec 8xA100-80GB]

The choice: the most precise weights that fit (bf16/fp16, then int8, then int4), then the smallest
tensor-parallel size that holds at least ``MIN_ROWS`` full-length rows (the more GPUs per group, the fewer
groups, so the smallest size that serves a real batch), else the size with the largest batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from config.models import ModelShape, ModelSpec

GIB = 1024**3
CONTEXT_BYTES = 1 * GIB  # the CUDA context, cuBLAS workspaces and allocator slack, per GPU
KV_SHARE = 0.8  # of what the weights leave, as the worker's memory budget takes it (worker.model.memory)
MIN_ROWS = 8
STEP_TOKENS = 512  # a GPU pass's token budget (the engine's default): its activations are set aside
# Bytes per weight of the linear layers: scales included (int8: one per row; int4: per group of 128).
WEIGHT_BYTES = {"none": 2.0, "int8": 1.01, "int4": 0.53}
PRECISION_ORDER = ("none", "int8", "int4")


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bandwidth_gbs: float  # memory bandwidth, GB/s (for the decode floor in bench/gpu.py)
    bf16: bool = True


# Memory as the cards report it (nvidia-smi's MiB), bandwidth from the vendors' data sheets.
GPUS = {
    gpu.name: gpu for gpu in (
        Gpu("A10-24GB", 23028 * 2**20, 600),
        Gpu("L4-24GB", 23034 * 2**20, 300),
        Gpu("T4-16GB", 15360 * 2**20, 320, bf16=False),
        Gpu("V100-32GB", 32768 * 2**20, 900, bf16=False),
        Gpu("L40S-48GB", 46068 * 2**20, 864),
        Gpu("A100-40GB", 40960 * 2**20, 1555),
        Gpu("A100-80GB", 81920 * 2**20, 2039),
        Gpu("H100-80GB", 81559 * 2**20, 3350),
        Gpu("H200-141GB", 143771 * 2**20, 4800),
    )
}


class PlacementError(ValueError):
    """No placement fits, or the one asked for does not."""


@dataclass(frozen=True)
class Placement:
    """One way to run the model on ``gpus`` cards: groups of ``tensor_parallel`` of them."""

    dtype: str
    quantization: str
    tensor_parallel: int
    weights_per_gpu: int
    kv_bytes_per_gpu: int
    kv_tokens: int  # token slots in each group's KV cache
    batch_at_max_length: int  # full-length rows that fit
    groups: int  # worker groups on these GPUs

    @property
    def fits(self) -> bool:
        return self.batch_at_max_length >= 1

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f" {self.quantization}"
        return f"{self.dtype}{quant}, tensor-parallel {self.tensor_parallel}"


def parse_gpus(spec: str) -> tuple[int, Gpu]:
    """``8xA100-80GB``, ``2xH200``, ``A10-24GB`` -> (count, card)."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?([A-Za-z0-9-]+)\s*", spec)
    if not match:
        raise PlacementError(f"--gpus-spec {spec!r}: write COUNTxCARD, e.g. 8xA100-80GB or 2xH200")
    count = int(match.group(1) or 1)
    wanted = match.group(2).upper()
    found = [gpu for name, gpu in GPUS.items() if name.upper() == wanted or name.upper().split("-")[0] == wanted]
    if len(found) != 1:
        raise PlacementError(f"--gpus-spec {spec!r}: unknown card {match.group(2)!r} (known: {', '.join(GPUS)})")
    if count < 1:
        raise PlacementError(f"--gpus-spec {spec!r}: at least one GPU")
    return count, found[0]


def gpu_from_memory(name: str, memory_bytes: int) -> Gpu:
    """A card seen on this machine (by nvidia-smi): the catalogue's entry if its name is known."""
    for gpu in GPUS.values():
        if gpu.name.split("-")[0] in name.upper().replace(" ", ""):
            return Gpu(gpu.name, memory_bytes, gpu.bandwidth_gbs, gpu.bf16)
    return Gpu(name, memory_bytes, 0.0)


def shape_of(spec: ModelSpec) -> ModelShape | None:
    """The model's shape: the registry's, or a local checkpoint's config.json."""
    if spec.shape is not None:
        return spec.shape
    config = Path(spec.source) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    try:
        return ModelShape(values["n_layer"], values.get("hidden_size") or values["n_embed"], values["n_head"],
                          values["vocab_size"])
    except KeyError:
        return None


def placement(shape: ModelShape, max_total_tokens: int, count: int, gpu: Gpu, quantization: str,
              tensor_parallel: int) -> Placement:
    """The figures of one placement (whether it fits or not)."""
    dtype = "bfloat16" if gpu.bf16 else "float16"
    weights = (shape.linear_params * WEIGHT_BYTES[quantization] + shape.embedding_params * 2) / tensor_parallel
    activations = (shape.n_head // tensor_parallel * STEP_TOKENS * max_total_tokens * 4
                   + STEP_TOKENS * shape.hidden * 8 * 2 + STEP_TOKENS * shape.vocab * 4)
    kv_bytes = max(0, int((gpu.memory_bytes - CONTEXT_BYTES - weights) * KV_SHARE - activations))
    kv_tokens = kv_bytes // (shape.kv_bytes_per_token(2) // tensor_parallel)
    return Placement(dtype, quantization, tensor_parallel, int(weights), kv_bytes, kv_tokens,
                     kv_tokens // max_total_tokens, count // tensor_parallel)


def options(shape: ModelShape, max_total_tokens: int, count: int, gpu: Gpu) -> list[Placement]:
    """Every placement on ``count`` cards: each quantization, each tensor-parallel size that divides the
    heads and fits in ``count``."""
    sizes = [n for n in range(1, count + 1) if shape.n_head % n == 0 and count % n == 0]
    return [placement(shape, max_total_tokens, count, gpu, q, n) for q in PRECISION_ORDER for n in sizes]


def choose(found: list[Placement]) -> Placement:
    """The launcher's choice among ``found`` (see the module's doc); PlacementError when none fits."""
    for quantization in PRECISION_ORDER:
        fitting = [p for p in found if p.quantization == quantization and p.fits]
        if fitting:
            roomy = [p for p in fitting if p.batch_at_max_length >= MIN_ROWS]
            return min(roomy, key=lambda p: p.tensor_parallel) if roomy else max(
                fitting, key=lambda p: p.batch_at_max_length)
    smallest = min(found, key=lambda p: p.weights_per_gpu)
    raise PlacementError(
        f"no placement fits: the smallest ({smallest.describe()}) needs {smallest.weights_per_gpu / GIB:.1f} GiB "
        "of weights per GPU plus a full-length row of KV cache")


def refusal(shape: ModelShape, max_total_tokens: int, count: int, gpu: Gpu, quantization: str,
            tensor_parallel: int) -> str | None:
    """Why the asked-for placement cannot fit on these GPUs (None: it fits)."""
    if shape.n_head % tensor_parallel:
        return f"{shape.n_head} attention heads do not divide into a tensor-parallel size of {tensor_parallel}"
    if tensor_parallel > count:
        return f"a tensor-parallel size of {tensor_parallel} needs {tensor_parallel} GPUs; there are {count}"
    asked = placement(shape, max_total_tokens, count, gpu, quantization, tensor_parallel)
    if asked.fits:
        return None
    return (f"{asked.describe()} needs {asked.weights_per_gpu / GIB:.1f} GiB of weights on each "
            f"{gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB), leaving no room for one {max_total_tokens}-token row "
            "of KV cache")


def table(name: str, shape: ModelShape, max_total_tokens: int, count: int, gpu: Gpu) -> str:
    """The planner's printout: every option, and the choice (or why nothing fits)."""
    found = options(shape, max_total_tokens, count, gpu)
    lines = [f"{name}: {shape.params / 1e9:.1f}B parameters on {count}x{gpu.name} "
             f"({gpu.memory_bytes / GIB:.1f} GiB each), rows of up to {max_total_tokens} tokens",
             f"{'dtype':<9} {'quant':<5} {'TP':>3} {'groups':>6} {'weights/GPU':>12} {'KV/GPU':>9} "
             f"{'KV tokens':>10} {'batch@max':>9}  fits"]
    for p in found:
        lines.append(f"{p.dtype:<9} {p.quantization:<5} {p.tensor_parallel:>3} {p.groups:>6} "
                     f"{p.weights_per_gpu / GIB:>8.1f} GiB {p.kv_bytes_per_gpu / GIB:>5.1f} GiB "
                     f"{p.kv_tokens:>10} {p.batch_at_max_length:>9}  {'yes' if p.fits else 'no'}")
    try:
        chosen = choose(found)
    except PlacementError as exc:
        lines.append(f"refused: {exc}")
    else:
        flags = f"--tensor-parallel {chosen.tensor_parallel} --quantize {chosen.quantization}"
        lines.append(f"chosen: {chosen.describe()}, {chosen.groups} group(s) ({flags})")
    return "\n".join(lines)

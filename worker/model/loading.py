"""Load a BLOOM checkpoint once per worker process, on the device it was given."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from config.models import ModelSpec
from worker.model.precision import DtypeChoice, cpu_dtype, gpu_dtype
from worker.model.quantize import QuantizationError, quantize
from worker.model.sharding import Shard, load_shard

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model and its tokenizer, ready on ``device``."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str = ""  # why this dtype (worker.model.precision), as the worker announces it
    load_peak_bytes: int = 0  # the rise in this process's resident memory while loading
    quantization: str = "none"  # weight-only quantization of the linear layers (worker.model.quantize)

    @property
    def weights_bytes(self) -> int:
        """Bytes this process's weights take (its shard's, in a tensor-parallel group; quantized weights
        counted as stored)."""
        return weights_bytes(self.model)


def weights_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters as stored (a tied weight once; a quantized weight by the tensors it
    is made of)."""
    unique = {id(param): param for param in model.parameters()}
    return sum(_stored_bytes(param) for param in unique.values())


def _stored_bytes(tensor: Any) -> int:
    if tensor is None:
        return 0
    if is_traceable_wrapper_subclass(tensor):  # e.g. torchao's quantized weights: data, scales ...
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


_HINT = (
    "If this machine cannot reach the Hugging Face hub, point BLOOMQ_MODEL (or --model) at a local "
    "directory holding the checkpoint: one written by `make tiny` / `python -m worker.model.tiny DIR`, or one "
    "downloaded elsewhere with `hf download bigscience/bloom-560m --local-dir DIR`."
)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the original error is chained as ``__cause__``."""


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``cuda`` or ``cpu``; ``auto`` takes the GPU when there is one. In a tensor-parallel group the
    process sees the group's GPUs and takes the one at its local rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was given but no CUDA device is visible to this process")
    return torch.device(f"cuda:{local_rank}" if requested == "cuda" else requested)


def choose_dtype(device: torch.device, policy: str) -> DtypeChoice:
    """The dtype ``policy`` gives on ``device``, and why (``worker.model.precision``)."""
    if device.type == "cuda":
        return gpu_dtype(policy, policy == "auto" and torch.cuda.is_bf16_supported())
    return cpu_dtype(policy)


def pick_dtype(device: torch.device, policy: str) -> torch.dtype:
    """bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16 matrix instructions (else
    fp32) -- unless the policy names a dtype."""
    return _DTYPES[choose_dtype(device, policy).name]


def load_model(spec: ModelSpec, device: torch.device, dtype_policy: str = "auto", rank: int = 0, world: int = 1,
               quantization: str = "none") -> LoadedModel:
    """Load ``spec``'s model and tokenizer with ``from_pretrained`` -- or, as rank ``rank`` of a
    tensor-parallel group of ``world``, only this rank's slices of the checkpoint -- and quantize its
    linear layers if asked; raise ModelLoadError on failure."""
    loaded = _load(spec, device, dtype_policy, rank, world)
    try:
        quantize(loaded.model, quantization, device)
    except QuantizationError as exc:
        raise ModelLoadError(f"could not quantize {spec.name} to {quantization}: {exc}") from exc
    loaded.quantization = quantization
    return loaded


def _load(spec: ModelSpec, device: torch.device, dtype_policy: str, rank: int, world: int) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _looks_like_path(spec.source) and not Path(spec.source).is_dir():
        raise ModelLoadError(f"model directory {spec.source!r} does not exist.\n{_HINT}")
    policy = spec.dtype if dtype_policy == "auto" else dtype_policy
    choice = choose_dtype(device, policy)
    dtype = _DTYPES[choice.name]
    if world > 1:
        loaded = _load_shard(spec, device, dtype, rank, world)
        loaded.dtype_reason = choice.reason
        return loaded
    log.info("loading %s from %s on %s as %s (%s)", spec.name, spec.source, device, choice.name, choice.reason)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.source)
        # BLOOM has no SDPA path in transformers 5; eager attention is the supported one. A process given
        # several GPUs (--gpus-per-worker) spreads the layers over them.
        spread = device.type == "cuda" and torch.cuda.device_count() > 1
        model = AutoModelForCausalLM.from_pretrained(
            spec.source, dtype=dtype, attn_implementation="eager", device_map="auto" if spread else None
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {spec.source!r}: {exc}\n{_HINT}") from exc
    if not spread:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, dtype_reason=choice.reason)


def _load_shard(spec: ModelSpec, device: torch.device, dtype: torch.dtype, rank: int, world: int) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    log.info("loading rank %d of %d of %s from %s on %s as %s", rank, world, spec.name, spec.source, device, dtype)
    try:
        directory = _local_checkpoint(spec.source)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        shard = Shard.of(AutoConfig.from_pretrained(directory), rank, world)
        model = load_shard(directory, shard, dtype, device)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load rank {rank} of {world} of {spec.source!r}: {exc}\n{_HINT}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                       load_peak_bytes=model.bloomq_load_peak_bytes)


def _local_checkpoint(source: str) -> str:
    """A directory holding the checkpoint: ``source`` itself, or the hub's copy (safetensors and config)."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])

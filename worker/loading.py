"""Load a BLOOM checkpoint once per worker process, on the device it was given."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from config.models import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model and its tokenizer, ready on ``device``."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


_HINT = (
    "If this machine cannot reach the Hugging Face hub, point BLOOMQ_MODEL (or --model) at a local "
    "directory holding the checkpoint: one written by `make tiny` / `python -m worker.tiny DIR`, or one "
    "downloaded elsewhere with `hf download bigscience/bloom-560m --local-dir DIR`."
)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the original error is chained as ``__cause__``."""


def pick_device(requested: str) -> torch.device:
    """``cuda`` or ``cpu``; ``auto`` takes the GPU when there is one."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was given but no CUDA device is visible to this process")
    return torch.device("cuda:0" if requested == "cuda" else requested)


def pick_dtype(device: torch.device, policy: str) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16 -- unless the policy names a dtype."""
    if policy != "auto":
        return _DTYPES[policy]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(spec: ModelSpec, device: torch.device, dtype_policy: str = "auto") -> LoadedModel:
    """Load ``spec``'s model and tokenizer with ``from_pretrained``; raise ModelLoadError on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _looks_like_path(spec.source) and not Path(spec.source).is_dir():
        raise ModelLoadError(f"model directory {spec.source!r} does not exist.\n{_HINT}")
    policy = spec.dtype if dtype_policy == "auto" else dtype_policy
    dtype = pick_dtype(device, policy)
    log.info("loading %s from %s on %s as %s", spec.name, spec.source, device, dtype)
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
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype)

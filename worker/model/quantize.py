"""Weight-only quantization of BLOOM's linear layers with torchao (the library transformers uses for it).

- ``int8``: ``Int8WeightOnlyConfig``, one scale per output row; on CPU and CUDA.
- ``int4``: on CUDA, ``Int4WeightOnlyConfig`` (groups of 128 input columns, bfloat16 weights, torchao's
  tensor-core kernel); on CPU, ``IntxWeightOnlyConfig`` with 4-bit values in groups of 32 (kept one per
  byte: a quarter of fp32, not an eighth).

The embeddings (tied to the LM head) and the LayerNorms stay as loaded: for BLOOM-176B they are 2 % of
the weights. Each rank of a tensor-parallel group quantizes its own slices; a slice whose input width
does not divide into int4 groups is refused with the numbers.
"""

from __future__ import annotations

from typing import Any

import torch

INT4_GROUP = {"cuda": 128, "cpu": 32}


class QuantizationError(ValueError):
    """The model cannot be quantized as asked, here."""


def quantize(model: Any, mode: str, device: torch.device) -> None:
    """Quantize ``model``'s linear layers in place (``mode``: ``none``, ``int8`` or ``int4``)."""
    if mode == "none":
        return
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    if mode == "int8":
        config: Any = Int8WeightOnlyConfig()
    elif mode == "int4":
        group = INT4_GROUP.get(device.type, 32)
        narrow = sorted({m.weight.shape[1] for m in linears.values() if m.weight.shape[1] % group})
        if narrow:
            raise QuantizationError(
                f"int4 quantizes in groups of {group} input columns on {device.type}; layers of input width "
                f"{', '.join(map(str, narrow))} do not divide into them (with tensor parallelism, each rank's "
                "slice counts): use int8 or another tensor-parallel size")
        if device.type == "cuda":
            if model.dtype != torch.bfloat16:
                raise QuantizationError(f"int4 on CUDA needs bfloat16 weights, not {model.dtype}: set "
                                        "BLOOMQ_DTYPE=bfloat16 (on a GPU with bf16) or use int8")
            config = Int4WeightOnlyConfig(group_size=group)
        else:
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
    else:
        raise QuantizationError(f"unknown quantization {mode!r}: none, int8 or int4")
    quantize_(model, config, filter_fn=lambda module, name: name in linears)

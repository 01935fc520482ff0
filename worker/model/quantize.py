"""Weight quantization of BLOOM's linear layers with torchao (the library transformers uses for it).

- ``int8``: one scale per output row. Weight-only (``Int8WeightOnlyConfig``: activations stay in the model's
  dtype, each weight is widened on every forward) or with the activations quantized too, per token, on the
  fly (``Int8DynamicActivationInt8WeightConfig``: int8 x int8 products, which CPUs with VNNI or AMX-INT8 and
  GPUs' int8 tensor cores multiply natively). ``int8_config`` picks per device (see ``INT8_DYNAMIC``).
- ``int4``: on CUDA, ``Int4WeightOnlyConfig`` (groups of 128 input columns, bfloat16 weights) packed for
  tinygemm, the int4 kernel that ships with torch (``tile_packed_to_4d``; torchao's default packing needs
  the separate ``mslk`` package); on CPU, ``IntxWeightOnlyConfig`` with 4-bit values in groups of 32 (kept
  one per byte: a quarter of fp32, not an eighth).

The embeddings (tied to the LM head) and the LayerNorms stay as loaded: for BLOOM-176B they are 2 % of
the weights. Each rank of a tensor-parallel group quantizes its own slices; a slice whose input width
does not divide into int4 groups is refused with the numbers. Whatever torchao raises while quantizing
(a missing kernel, an unsupported device) becomes a ``QuantizationError`` naming the mode, so the worker
stops with the clear refusal every bad setting gets, the original error chained.
"""

from __future__ import annotations

from typing import Any

import torch

INT4_GROUP = {"cuda": 128, "cpu": 32}
# Where int8 quantizes the activations too. CPU: weight-only, measured faster on a Zen 4 CPU with VNNI (no
# AMX): bf16 activations with int8 weights ran 72 tok/s at 32 rows and 137 ms a step alone, int8 activations
# 50 tok/s and 236 ms (bloom-560m shape). CUDA: int8 x int8 products read the int8 weights as they are
# (weight-only widens every weight on every forward in torchao's eager path): not yet measured on a GPU.
INT8_DYNAMIC = {"cuda": True, "cpu": False}


class QuantizationError(ValueError):
    """The model cannot be quantized as asked, here."""


def int8_config(device_type: str) -> Any:
    """torchao's int8 config for a device (``INT8_DYNAMIC``)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8DynamicActivationInt8WeightConfig() if INT8_DYNAMIC.get(device_type) else Int8WeightOnlyConfig()


def int4_config(device_type: str, dtype: torch.dtype) -> Any:
    """torchao's int4 config for a device, with a packing whose kernel ships with torch or torchao."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    group = INT4_GROUP.get(device_type, 32)
    if device_type == "cuda":
        if dtype != torch.bfloat16:
            raise QuantizationError(f"int4 on CUDA needs bfloat16 weights, not {dtype}: set BLOOMQ_DTYPE=bfloat16 "
                                    "(on a GPU with bf16) or use int8")
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def quantize(model: Any, mode: str, device: torch.device) -> None:
    """Quantize ``model``'s linear layers in place (``mode``: ``none``, ``int8`` or ``int4``)."""
    if mode == "none":
        return
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    if mode == "int8":
        config = _configured(lambda: int8_config(device.type), mode)
    elif mode == "int4":
        group = INT4_GROUP.get(device.type, 32)
        narrow = sorted({m.weight.shape[1] for m in linears.values() if m.weight.shape[1] % group})
        if narrow:
            raise QuantizationError(
                f"int4 quantizes in groups of {group} input columns on {device.type}; layers of input width "
                f"{', '.join(map(str, narrow))} do not divide into them (with tensor parallelism, each rank's "
                "slice counts): use int8 or another tensor-parallel size")
        config = _configured(lambda: int4_config(device.type, model.dtype), mode)
    else:
        raise QuantizationError(f"unknown quantization {mode!r}: none, int8 or int4")
    from torchao.quantization import quantize_

    try:
        quantize_(model, config, filter_fn=lambda module, name: name in linears)
    except Exception as exc:  # a missing kernel or package, an unsupported device: refused, with the cause
        raise QuantizationError(f"torchao could not quantize to {mode} ({type(config).__name__}) on "
                                f"{device.type}: {type(exc).__name__}: {exc}") from exc


def _configured(make: Any, mode: str) -> Any:
    try:
        return make()
    except QuantizationError:
        raise
    except Exception as exc:  # torchao missing or too old for the config
        raise QuantizationError(f"torchao has no {mode} configuration here: {type(exc).__name__}: {exc}") from exc

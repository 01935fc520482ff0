"""The dtype policy: bf16 where the device computes it natively, detected from the CPU's own flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config.models import resolve_model
from worker.model.loading import load_model, pick_dtype
from worker.model.precision import cpu_dtype, cpu_flags, gpu_dtype, native_bf16

CPU = torch.device("cpu")


def test_the_flags_are_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx512f avx512_bf16 amx_int8\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16 amx_int8\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx512f", "avx512_bf16", "amx_int8"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),
    ({"avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx512f", "avx2"}, "float32"),
    (set(), "float32"),
])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16_instructions(flags, expected):
    choice = cpu_dtype("auto", frozenset(flags))
    assert choice.name == expected
    assert ("has native bf16" in choice.reason) == (expected == "bfloat16")
    assert all(flag in choice.reason for flag in native_bf16(frozenset(flags)))


def test_a_configured_dtype_wins_over_the_detection():
    assert cpu_dtype("float32", frozenset({"amx_bf16"})).name == "float32"
    assert cpu_dtype("bf16", frozenset()).name == "bfloat16"
    assert gpu_dtype("float16", True).name == "float16"
    assert gpu_dtype("auto", True).name == "bfloat16" and gpu_dtype("auto", False).name == "float16"


def test_this_machines_choice_agrees_with_torchs_own_reading_of_the_cpu():
    # torch reads the CPU with cpuid, not /proc/cpuinfo: two readings of the same instructions.
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (pick_dtype(CPU, "auto") is torch.bfloat16) == torch_says
    assert pick_dtype(CPU, "float32") is torch.float32 and pick_dtype(CPU, "bfloat16") is torch.bfloat16


def test_a_model_loaded_with_auto_carries_the_detected_dtype_and_its_reason(tiny_model_dir):
    expected = cpu_dtype("auto")
    loaded = load_model(resolve_model(str(tiny_model_dir)), CPU, "auto")
    assert str(loaded.dtype) == f"torch.{expected.name}" and loaded.model.dtype == loaded.dtype
    assert loaded.dtype_reason == expected.reason

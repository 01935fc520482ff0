"""Which dtype a worker computes in, and why.

``auto`` (``BLOOMQ_DTYPE``'s default) picks per device, at start-up:

- a GPU: bfloat16 where it supports it, else float16;
- a CPU: bfloat16 where the CPU has native bf16 matrix instructions (AMX-BF16, or AVX512-BF16): its
  matrix products then run several times faster than in float32 and its weights take half the memory
  traffic; float32 elsewhere, where bf16 would be emulated (slower than float32).

The CPU's instructions are read from its flags (``/proc/cpuinfo``), never assumed: developer machines and
cloud hosts differ. Plain Python, so the launcher can describe the choice before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Intel AMX tiles; AVX512-BF16 (Intel Cooper Lake+, AMD Zen 4+)
NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a worker loads its weights in, and the reason it announces with it."""

    name: str  # float32, float16 or bfloat16
    reason: str


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where the kernel does not say)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str]) -> list[str]:
    """Which of the flags that mean native bf16 matrix instructions the CPU has."""
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def cpu_dtype(policy: str, flags: frozenset[str] | None = None) -> DtypeChoice:
    """The dtype a CPU worker uses under ``policy`` (``auto`` or a dtype name)."""
    if policy != "auto":
        name = NAMES.get(policy, policy)
        return DtypeChoice(name, f"{name}, as configured")
    found = native_bf16(cpu_flags() if flags is None else flags)
    if found:
        return DtypeChoice("bfloat16", f"auto: this CPU has native bf16 matrix instructions ({', '.join(found)})")
    return DtypeChoice("float32", "auto: this CPU has no native bf16 matrix instructions (no "
                                  f"{' or '.join(NATIVE_BF16_FLAGS)} flag), so float32")


def gpu_dtype(policy: str, bf16_supported: bool) -> DtypeChoice:
    """The dtype a GPU worker uses under ``policy``."""
    if policy != "auto":
        name = NAMES.get(policy, policy)
        return DtypeChoice(name, f"{name}, as configured")
    if bf16_supported:
        return DtypeChoice("bfloat16", "auto: the GPU supports bf16")
    return DtypeChoice("float16", "auto: the GPU has no bf16, so float16")

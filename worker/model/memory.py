"""Device memory: what the KV cache may take, what is in use, giving memory back."""

from __future__ import annotations

import os

import torch


def kv_budget_bytes(device: torch.device) -> int:
    """Bytes the KV cache and a step's activations may take: 80 % of the device memory left after loading
    (GPU; the rest is allocator slack), or half the memory available to the process (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return _mem_available_bytes() // 2


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_in_use(device: torch.device) -> int:
    """Bytes of device memory allocated (GPU), or this process's resident memory (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""Device memory: what one KV-cache token costs, the cache budget that fits, giving memory back."""

from __future__ import annotations

import os
from typing import Any

import torch

def kv_bytes_per_slot(model: Any) -> int:
    """Bytes one token of one row occupies in the KV cache (keys + values, all layers)."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    return 2 * config.n_layer * config.hidden_size * itemsize


def default_slot_budget(model: Any, device: torch.device) -> int:
    """KV slots that fit in the memory left after loading the model."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        available = free * 0.8  # the rest is for activations, logits and allocator slack
    else:
        available = _mem_available_bytes() * 0.5
    return max(1, int(available // kv_bytes_per_slot(model)))


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

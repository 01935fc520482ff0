"""A KV cache layer that grows in place, instead of re-concatenating the whole cache every step.

transformers' ``DynamicLayer.update`` does ``torch.cat([keys, new], dim=-2)`` on every decode step: it
copies the entire cache (all rows, all past tokens) once per token. For a 32-row batch of a 24-layer model
that is hundreds of MB per step. ``GrowingLayer`` keeps spare capacity along the length dimension and
writes new keys/values into it; ``keys``/``values`` are views of the filled part.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

GROWTH_STEP = 64  # columns added at a time, so reallocation happens once every 64 tokens at most


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose storage has room to grow along the sequence dimension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        super().__init__(*args, **kwargs)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k[:, :, : self._len, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._len = 0 if value is None or value.dim() < 3 else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v[:, :, : self._len, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    @property
    def filled(self) -> int:
        """Positions holding keys/values; setting it lower forgets the ones after (storage is kept)."""
        return self._len

    @filled.setter
    def filled(self, length: int) -> None:
        self._len = length

    def replace(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Hold storage filled by the caller up to ``length``; the rest is room to grow."""
        self._k, self._v = keys, values
        self._len = length

    def keep_rows(self, holes: torch.Tensor, movers: torch.Tensor, rows: int) -> None:
        """Move rows ``movers`` into rows ``holes``, then keep the first ``rows`` rows (a view)."""
        assert self._k is not None and self._v is not None
        if holes.numel():
            holes, movers = holes.to(self._k.device), movers.to(self._k.device)
            self._k.index_copy_(0, holes, self._k.index_select(0, movers))
            self._v.index_copy_(0, holes, self._v.index_select(0, movers))
        self._k, self._v = self._k[:rows], self._v[:rows]

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` positions (padding for every row); a view, no copy."""
        assert self._k is not None and self._v is not None
        self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
        self._len -= columns

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized or self._k is None or self._k.dim() < 3 or self._len == 0:
            self.device = key_states.device
            self.is_initialized = True
            self._k, self._v = key_states, value_states
            self._len = key_states.shape[-2]
            return self.keys, self.values
        new = key_states.shape[-2]
        needed = self._len + new
        if needed > self._k.shape[-2]:
            capacity = needed + GROWTH_STEP
            self._k = _grow(self._k, self._len, capacity)
            self._v = _grow(self._v, self._len, capacity)
        self._k[:, :, self._len : needed, :] = key_states
        self._v[:, :, self._len : needed, :] = value_states
        self._len = needed
        return self.keys, self.values


def _grow(storage: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    batch, heads, _, dim = storage.shape
    bigger = storage.new_empty((batch, heads, capacity, dim))
    bigger[:, :, :used, :] = storage[:, :, :used, :]
    return bigger


def with_room(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised storage for ``shape`` plus spare length for the next tokens."""
    batch, heads, length, dim = shape
    return like.new_empty((batch, heads, length + GROWTH_STEP, dim))


def growing_cache(config: Any) -> DynamicCache:
    """An empty cache for ``config``'s layers, made of ``GrowingLayer``s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache

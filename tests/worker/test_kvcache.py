"""The growing KV cache layer: appends in place, keeps rows, drops left padding, rolls back."""

import torch
from transformers import BloomConfig

from worker.kvcache import GROWTH_STEP, GrowingLayer, growing_cache, with_room


def _kv(rows: int, length: int, start: float = 0.0) -> torch.Tensor:
    values = torch.arange(rows * 2 * length * 3, dtype=torch.float32) + start
    return values.view(rows, 2, length, 3)


def test_updates_append_in_place_with_room_to_grow():
    layer = GrowingLayer()
    first = _kv(2, 4)
    keys, values = layer.update(first, first + 1)
    assert torch.equal(keys, first) and torch.equal(values, first + 1)
    step = _kv(2, 1, start=1000)
    keys, _ = layer.update(step, step)
    storage = layer._k
    assert keys.shape == (2, 2, 5, 3) and torch.equal(keys[:, :, :4], first) and torch.equal(keys[:, :, 4:], step)
    assert storage.shape[2] >= 5 + GROWTH_STEP - 1  # grown once, with spare columns
    layer.update(step + 1, step + 1)
    assert layer._k is storage  # the next step writes into the spare room: no copy


def test_keep_rows_moves_rows_into_holes_and_drop_left_trims_padding():
    layer = GrowingLayer()
    kv = _kv(3, 4)
    layer.update(kv, kv)
    # keep rows 0 and 2: row 2 moves into the hole at row 1
    layer.keep_rows(torch.tensor([1]), torch.tensor([2]), rows=2)
    assert torch.equal(layer.keys[0], kv[0]) and torch.equal(layer.keys[1], kv[2])
    layer.drop_left(1)
    assert layer.keys.shape == (2, 2, 3, 3) and torch.equal(layer.keys[1], kv[2, :, 1:])


def test_filled_can_be_rolled_back_after_a_failed_step():
    layer = GrowingLayer()
    kv = _kv(1, 4)
    layer.update(kv, kv)
    filled = layer.filled
    layer.update(_kv(1, 1, 99), _kv(1, 1, 99))
    layer.filled = filled
    assert torch.equal(layer.keys, kv)


def test_replace_holds_caller_storage_and_a_cache_is_made_of_growing_layers():
    storage = with_room((2, 2, 4, 3), _kv(1, 1))
    assert storage.shape == (2, 2, 4 + GROWTH_STEP, 3)
    storage[:, :, :4] = _kv(2, 4)
    layer = GrowingLayer()
    layer.replace(storage, storage.clone(), 4)
    assert torch.equal(layer.keys, _kv(2, 4))

    cache = growing_cache(BloomConfig(n_layer=3, hidden_size=8, n_head=2))
    assert len(cache.layers) == 3 and all(isinstance(layer, GrowingLayer) for layer in cache.layers)

"""FlexAttention over the paged pool: which attention a worker picks, and the start-up check that picks it.

Its parity with transformers' eager BLOOM is in test_paged.py (every paged test runs with both plans)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers import BloomConfig

from worker.engine import flex
from worker.engine.attention import AttentionPlan, alibi_slopes
from worker.engine.blocks import BlockPool
from worker.engine.chunk import Chunk
from worker.engine.paged import PagedKV

BLOCK = 4
HEADS = 6
CPU = torch.device("cpu")


def _kv(blocks=16):
    config = BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=HEADS)
    kv = PagedKV(config, blocks, BLOCK, torch.float32, CPU)
    for pool in (*kv.keys, *kv.values):
        pool.zero_()  # uncompiled FlexAttention reads every slot
    return kv


def _choose(kind, kv, device=CPU, kernel=flex_attention):
    return flex.choose(kind, kv, device, alibi_slopes(HEADS), 0.125, kernel=kernel)


def test_gather_is_used_when_asked_and_by_default_on_a_cpu():
    def never(*args, **kwargs):
        raise AssertionError("no kernel is tried")

    for kind in ("gather", "auto"):
        name, plan = _choose(kind, _kv(), kernel=never)
        assert (name, plan) == ("gather", AttentionPlan)


def test_flex_asked_for_is_checked_and_used_when_it_matches():
    name, plan = _choose("flex", _kv())
    assert name == "flex" and plan.func is flex.FlexPlan


def test_flex_asked_for_stops_the_worker_naming_the_setting_when_the_kernel_fails_or_differs():
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    def wrong(*args, **kwargs):
        return flex_attention(*args, **kwargs) + 0.01

    with pytest.raises(RuntimeError, match="BLOOMQ_ATTENTION=flex .*no kernel for this device"):
        _choose("flex", _kv(), kernel=broken)
    with pytest.raises(RuntimeError, match="BLOOMQ_ATTENTION=flex .*differs from an fp32 computation of the same scores by 0.01"):
        _choose("flex", _kv(), kernel=wrong)


def test_auto_on_a_gpu_falls_back_to_gather_with_a_warning_when_the_check_fails(caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: out of shared memory")

    with caplog.at_level(logging.WARNING, logger="worker.engine.flex"):
        name, plan = _choose("auto", _kv(), device=torch.device("cuda"), kernel=broken)
    assert (name, plan) == ("gather", AttentionPlan)
    assert "FlexAttention is not used on cuda" in caplog.text


def test_a_pool_too_small_for_the_check_is_not_given_flex():
    with pytest.raises(RuntimeError, match="too few blocks"):
        _choose("flex", _kv(blocks=6))


def test_slots_after_a_rows_end_are_zeroed_before_the_kernel_reads_them():
    # A freed block keeps what its last row wrote (NaNs of a failed row included); the kernel reads a row's
    # last block whole, with a weight of zero past its end, and 0 * NaN would spread to the new row.
    kv = _kv()
    keys, values = kv.keys[0], kv.values[0]
    for pool in (keys, values):
        pool.fill_(float("nan"))
        pool[:BLOCK + 2] = 1.0  # row 0: positions 0..5 written (blocks 0 and 1)
    chunks = [Chunk([1], 5, [0, 1])]
    plan = flex.FlexPlan(chunks, kv.null_slot, CPU, BLOCK, kernel=flex_attention)
    assert plan.stale.tolist() == [BLOCK + 2, BLOCK + 3]
    plan.attend(torch.ones(1, HEADS, 8), keys, values, alibi_slopes(HEADS), 0.125)
    assert keys[BLOCK + 2 : 2 * BLOCK].eq(0).all() and values[BLOCK + 2 : 2 * BLOCK].eq(0).all()
    assert keys[2 * BLOCK :].isnan().all()  # nothing else is touched


def test_a_failed_rows_own_blocks_are_dropped_from_the_prefix_index_and_cleared():
    kv = _kv()
    pool = BlockPool(kv.num_blocks, BLOCK)
    shared, own = pool.take(1), pool.take(2)
    pool.cache(shared[0], b"prefix")
    pool.cache(own[0], b"prefix+own")
    pool.share(shared)  # another row holds the prefix block too
    for tensor in (*kv.keys, *kv.values):
        tensor.fill_(float("nan"))
    alone = pool.discard(shared + own)
    kv.zero(alone)
    assert alone == own and pool.match([b"prefix+own"]) == [] and pool.match([b"prefix"]) == shared
    for tensor in (*kv.keys, *kv.values):
        assert tensor[own[0] * BLOCK : (own[0] + 1) * BLOCK].eq(0).all()
        assert tensor[own[1] * BLOCK : (own[1] + 1) * BLOCK].eq(0).all()
        assert tensor[shared[0] * BLOCK : (shared[0] + 1) * BLOCK].isnan().all()  # still another row's


def _bf16_kv():
    """A bf16 pool with bloom-560m's attention shape (16 heads of 64) and the default block of 16 slots: the
    check's positions reach the tens, where ALiBi's bias (slope 0.71 x position) is ~26 and bf16 keeps it
    only to 0.125."""
    config = BloomConfig(vocab_size=97, hidden_size=1024, n_layer=1, n_head=16)
    kv = PagedKV(config, 16, 16, torch.bfloat16, CPU)
    for pool in (*kv.keys, *kv.values):
        pool.zero_()
    return kv


class _GatheringAsKernel(AttentionPlan):
    """The gathering path in the pool's dtype, standing in for a kernel (it rounds ALiBi's bias to bf16)."""

    fallback = None

    def _attend(self, *args):
        return self.attend(*args)


def test_in_bf16_the_check_compares_with_fp32_so_a_right_kernel_passes_and_bias_rounding_fails():
    slopes = alibi_slopes(16)
    kernel = functools.partial(flex.FlexPlan, kernel=flex_attention)
    assert flex.self_check(kernel, _bf16_kv(), CPU, slopes, 0.125) is None
    # A bf16 reference would be this path: its own rounding alone is over the tolerance at these positions.
    why = flex.self_check(_GatheringAsKernel, _bf16_kv(), CPU, slopes, 0.125)
    assert why is not None and "fp32 computation" in why


@pytest.mark.slow
def test_the_compiled_kernel_passes_the_start_up_check_on_this_cpu_in_bf16():
    # The kernel a GPU worker would serve with (bf16 there), compiled by inductor for this CPU: the real
    # block mask, strides and padding go through it, on decode rows and prompt chunks of two shapes each,
    # compared with an fp32 computation of the same scores. The pool starts as NaNs (uninitialised memory
    # may hold any bits): the check and serving see zeros instead.
    kv = _bf16_kv()
    for pool in (*kv.keys, *kv.values):
        pool.fill_(float("nan"))
    name, plan = flex.choose("flex", kv, CPU, alibi_slopes(16), 0.125, kernel=flex.compiled_kernel())
    assert name == "flex"
    assert all(pool.eq(0).all() for pool in (*kv.keys, *kv.values))  # nothing of the check is left
    keys, values = kv.keys[0], kv.values[0]
    chunks = [Chunk([1], 40, [0, 2, 6]), Chunk([1] * 5, 19, [3, 4])]
    for slot in [*range(0, 16), *range(32, 48), *range(96, 105), *range(48, 80)]:  # what the rows wrote
        keys[slot], values[slot] = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    query = torch.randn(6, 16, 64).bfloat16()
    wide = [torch.cat([pool[:kv.null_slot].float(), torch.zeros(1, 16, 64)]) for pool in (keys, values)]
    expected = AttentionPlan(chunks, kv.null_slot, CPU, 16).attend(query.float(), *wide, alibi_slopes(16), 0.125)
    got = plan(chunks, kv.null_slot, CPU, 16).attend(query, keys, values, alibi_slopes(16), 0.125)
    assert float((got.float() - expected).abs().max()) <= flex.TOLERANCE[torch.bfloat16]


def test_a_kernel_failing_while_serving_leaves_the_pass_and_the_passes_after_it_to_gathering(monkeypatch, caplog):
    monkeypatch.setattr(flex, "FAILED", [])
    calls = []

    def fails_once_compiled(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CppCompileError: a shape the check did not see")

    kv = _kv()
    keys, values = kv.keys[0], kv.values[0]
    keys.normal_(), values.normal_()
    slopes = alibi_slopes(HEADS)
    chunks = [Chunk([1], 9, [0, 2, 6]), Chunk([1] * 5, 3, [3, 4])]
    query = torch.randn(6, HEADS, 8)
    expected = AttentionPlan(chunks, kv.null_slot, CPU, BLOCK).attend(query, keys, values, slopes, 0.125)
    with caplog.at_level(logging.ERROR, logger="worker.engine.flex"):
        got = flex.FlexPlan(chunks, kv.null_slot, CPU, BLOCK, kernel=fails_once_compiled).attend(
            query, keys, values, slopes, 0.125)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "gathers rows from now on" in caplog.text and len(calls) == 1
    later = flex.FlexPlan(chunks, kv.null_slot, CPU, BLOCK, kernel=fails_once_compiled)
    torch.testing.assert_close(later.attend(query, keys, values, slopes, 0.125), expected, rtol=0, atol=0)
    assert len(calls) == 1 and later.calls == []  # not tried again

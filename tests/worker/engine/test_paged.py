"""BLOOM over the paged KV cache against transformers' eager BLOOM: same logits (fp32, within 1e-4), same
greedy tokens, whatever the rows' lengths, the chunking of their prompts or the blocks they are given."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom import modeling_bloom

from worker.engine import attention as attention_module
from worker.engine.attention import AttentionPlan, alibi_slopes
from worker.engine.blocks import BlockPool
from worker.engine.chunk import ALL, LAST, NONE, Chunk
from worker.engine.flex import FlexPlan
from worker.engine.paged import PagedBloom, PagedKV

BLOCK = 4


@pytest.fixture(scope="module", params=[False, True], ids=["residual-pre-ln", "residual-post-ln"])
def model(request):
    # 6 heads: not a power of two, so the second series of ALiBi slopes is used too. A wide init (0.5) so
    # greedy text varies and equality means something.
    config = BloomConfig(vocab_size=97, hidden_size=48, n_layer=3, n_head=6, initializer_range=0.5,
                         apply_residual_connection_post_layernorm=request.param)
    torch.manual_seed(0)
    return BloomForCausalLM(config).eval()


@pytest.fixture(params=["gather", "flex"])
def attention(request):
    """The plan each test's passes attend by: rows gathered for SDPA, or FlexAttention over the pool in place
    (uncompiled here: the same masks and scores as the compiled kernel, evaluated densely)."""
    return AttentionPlan if request.param == "gather" else functools.partial(FlexPlan, kernel=flex_attention)


def _paged(model, attention, blocks=64):
    kv = PagedKV(model.config, blocks, BLOCK, torch.float32, torch.device("cpu"))
    for pool in (*kv.keys, *kv.values):
        pool.zero_()  # uncompiled FlexAttention reads every slot (the kernel reads only a row's blocks)
    return PagedBloom(model, kv, attention=attention), BlockPool(blocks, BLOCK)


def _reference_logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def _prompts(lengths, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(4, 97) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("heads", list(range(1, 21)) + [32, 112])
def test_slopes_are_blooms(heads):
    expected = modeling_bloom._get_alibi_slopes(heads, torch.device("cpu"))
    assert torch.allclose(alibi_slopes(heads), expected, rtol=0, atol=1e-7)


def test_prefill_of_mixed_lengths_in_one_pass_equals_each_prompt_alone(model, attention):
    paged, pool = _paged(model, attention)
    prompts = _prompts([1, 3, 4, 9, 17, 5])
    chunks = [Chunk(p, 0, pool.take(pool.blocks_for(len(p))), ALL) for p in prompts]
    with torch.inference_mode():
        logits = paged.forward(chunks)
    for prompt, got in zip(prompts, logits, strict=True):
        torch.testing.assert_close(got, _reference_logits(model, prompt), rtol=0, atol=1e-4)


def test_chunked_prefill_with_boundaries_inside_blocks_equals_whole_prefill(model, attention):
    paged, pool = _paged(model, attention)
    prompt = _prompts([23])[0]
    table = pool.take(pool.blocks_for(len(prompt)))
    got = []
    with torch.inference_mode():
        for start, end in [(0, 3), (3, 10), (10, 11), (11, 23)]:  # 3, 10, 11: mid-block
            [logits] = paged.forward([Chunk(prompt[start:end], start, table, ALL)])
            got.append(logits)
    torch.testing.assert_close(torch.cat(got), _reference_logits(model, prompt), rtol=0, atol=1e-4)


def test_decode_rows_and_a_joining_chunk_in_one_pass_match_greedy_generate(model, attention):
    paged, pool = _paged(model, attention)
    prompts = _prompts([2, 7, 13], seed=3)
    late = _prompts([11], seed=4)[0]
    steps = 12
    expected = [model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                               attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
                for p in [*prompts, late]]
    # Tables scattered over the pool (blocks taken in a shuffled order, not contiguous).
    rng = random.Random(5)
    order = list(range(pool.num_blocks))
    rng.shuffle(order)
    spare = iter(order)
    tables = [[next(spare) for _ in range(pool.blocks_for(len(p) + steps))] for p in [*prompts, late]]
    generated: list[list[int]] = [[] for _ in range(4)]
    with torch.inference_mode():
        logits = paged.forward([Chunk(p, 0, t, LAST) for p, t in zip(prompts, tables, strict=False)])
        for row, scores in enumerate(logits):
            generated[row].append(int(scores[-1].argmax()))
        for step in range(1, steps + 1):
            chunks = [Chunk([generated[row][-1]], len(prompts[row]) + len(generated[row]) - 1, tables[row], LAST)
                      for row in range(3) if len(generated[row]) < steps]
            rows = [row for row in range(3) if len(generated[row]) < steps]
            if step == 4:  # a new prompt joins the decoding rows, in two chunks over two passes
                chunks.append(Chunk(late[:6], 0, tables[3], NONE))
                rows.append(None)
            elif step == 5:
                chunks.append(Chunk(late[6:], 6, tables[3], LAST))
                rows.append(3)
            elif step > 5 and len(generated[3]) < steps:
                chunks.append(Chunk([generated[3][-1]], len(late) + len(generated[3]) - 1, tables[3], LAST))
                rows.append(3)
            out = paged.forward(chunks)
            for row, scores in zip(rows, out, strict=True):
                if row is None:
                    assert scores is None
                    continue
                generated[row].append(int(scores[-1].argmax()))
        while len(generated[3]) < steps:
            [scores] = paged.forward([Chunk([generated[3][-1]], len(late) + len(generated[3]) - 1, tables[3])])
            generated[3].append(int(scores[-1].argmax()))
    assert generated == expected


def test_a_shared_prefix_block_serves_two_rows_as_if_each_had_computed_it(model, attention):
    paged, pool = _paged(model, attention)
    prefix = _prompts([8], seed=9)[0]  # two full blocks
    a, b = prefix + [5, 6, 7], prefix + [50, 60]
    table_a = pool.take(pool.blocks_for(len(a)))
    with torch.inference_mode():
        paged.forward([Chunk(a, 0, table_a, NONE)])
        # b reuses a's two full blocks and computes only its own tail into a block of its own.
        table_b = table_a[:2] + pool.take(1)
        [logits] = paged.forward([Chunk(b[8:], 8, table_b, ALL)])
    torch.testing.assert_close(logits, _reference_logits(model, b)[8:], rtol=0, atol=1e-4)


def test_decode_rows_sharing_prefix_blocks_attend_them_once_and_match_each_alone(model, attention, monkeypatch):
    # Three rows share a prefix of three cached blocks and decode together with a row of their own; the
    # sharing rows are attended as a group (the shared keys read once), the other on its own. (A group
    # forms from 256 shared positions on; these 12 are made enough.)
    monkeypatch.setattr(attention_module, "GROUP_MIN_TOKENS", 12)
    paged, pool = _paged(model, attention)
    prefix = _prompts([12], seed=11)[0]
    tails = [[5, 6, 7], [50, 60], [9, 9, 9, 9, 9, 41]]
    other = _prompts([10], seed=12)[0]
    prefix_table = pool.take(3)
    tables = [prefix_table + pool.take(pool.blocks_for(len(prefix) + len(t)) - 3) for t in tails]
    other_table = pool.take(pool.blocks_for(len(other)))
    texts = [prefix + t for t in tails]
    with torch.inference_mode():
        paged.forward([Chunk(prefix, 0, prefix_table, NONE)])
        # Each sharing row reads its own tail but its newest token; the other row its prompt but the last.
        paged.forward([Chunk(t[:-1], 12, table, NONE) for t, table in zip(tails, tables, strict=True) if len(t) > 1]
                      + [Chunk(other[:-1], 0, other_table, NONE)])
        plan_rows = [Chunk(text[-1:], len(text) - 1, table, LAST) for text, table in zip(texts, tables, strict=True)]
        plan_rows.append(Chunk(other[-1:], len(other) - 1, other_table, LAST))
        plan = AttentionPlan(plan_rows, paged.kv.null_slot, torch.device("cpu"), BLOCK)
        assert len(plan.groups) == 1 and plan.groups[0].shared.numel() == 12 and plan.decode_rows.numel() == 1
        logits = paged.forward(plan_rows)
    for text, got in zip([*texts, other], logits, strict=True):
        torch.testing.assert_close(got[0], _reference_logits(model, text)[-1], rtol=0, atol=1e-4)


def test_in_bf16_the_logits_are_as_near_fp32_as_transformers_own_bf16_and_choose_alike(model, attention):
    # A bf16 engine (the default on a CPU with native bf16) cannot match fp32 bit for bit. What bf16 allows is
    # what transformers' own bf16 model does on the same prompts: the paged pass must stay as close to the
    # fp32 scores as that (on average within a quarter more, at worst twice), and pick the fp32 model's next
    # token as often.
    bf16 = BloomForCausalLM(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    kv = PagedKV(bf16.config, 64, BLOCK, torch.bfloat16, torch.device("cpu"))
    for pool in (*kv.keys, *kv.values):
        pool.zero_()
    paged, pool = PagedBloom(bf16, kv, attention=attention), BlockPool(64, BLOCK)
    prompts = _prompts([5, 12, 19, 31], seed=7)
    chunks = [Chunk(p, 0, pool.take(pool.blocks_for(len(p))), ALL) for p in prompts]
    with torch.inference_mode():
        logits = paged.forward(chunks)
    errors = {"ours": [], "theirs": []}
    agree = {"ours": 0, "theirs": 0}
    for prompt, got in zip(prompts, logits, strict=True):
        reference = _reference_logits(model, prompt)
        for who, scores in (("ours", got.float()), ("theirs", _reference_logits(bf16, prompt))):
            errors[who].append((scores - reference).abs().flatten())
            agree[who] += int((scores.argmax(-1) == reference.argmax(-1)).sum())
    ours, theirs = torch.cat(errors["ours"]), torch.cat(errors["theirs"])
    assert ours.mean() <= 1.25 * theirs.mean()
    assert ours.max() <= 2 * theirs.max()
    positions = sum(len(p) for p in prompts)
    assert agree["ours"] >= agree["theirs"] - 0.05 * positions and agree["ours"] >= 0.75 * positions

"""Our batched logits transforms against transformers' own processors, row by row."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from worker.engine.params import SamplingParams
from worker.engine.sampling import RowSampling, TokenChooser, _top_k, _top_p, _typical

VOCAB = 97


@pytest.fixture()
def logits() -> torch.Tensor:
    return torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 4


@pytest.mark.parametrize(
    ("ours", "theirs", "values"),
    [
        (lambda x, v: _top_k(x, torch.tensor(v), max(v)), lambda v: TopKLogitsWarper(top_k=v), [1, 5, 40]),
        (lambda x, v: _top_p(x, torch.tensor([[p] for p in v])), lambda v: TopPLogitsWarper(top_p=v), [0.1, 0.5, 0.95]),
        (lambda x, v: _typical(x, torch.tensor([[p] for p in v])), lambda v: TypicalLogitsWarper(mass=v),
         [0.2, 0.6, 0.9]),
    ],
    ids=["top_k", "top_p", "typical_p"],
)
def test_warpers_match_transformers_row_by_row(logits, ours, theirs, values):
    batched = ours(logits, values)
    for row, value in enumerate(values):
        assert torch.equal(batched[row : row + 1], theirs(value)(None, logits[row : row + 1]))


def test_repetition_penalty_and_temperature_match_transformers(logits):
    seen_ids = torch.tensor([[3, 7, 7, 50]])
    rows = [RowSampling.from_parameters(SamplingParams(do_sample=True, repetition_penalty=2.0, temperature=0.7, seed=1))]
    chooser = TokenChooser(rows, torch.device("cpu"))
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, seen_ids[0]] = True
    ours = chooser._warp(chooser._penalise(logits[:1], seen))
    theirs = TemperatureLogitsWarper(0.7)(seen_ids, RepetitionPenaltyLogitsProcessor(2.0)(seen_ids, logits[:1].clone()))
    assert torch.allclose(ours, theirs)


def test_greedy_rows_take_the_argmax_and_ignore_sampling_rows(logits):
    rows = [
        RowSampling.from_parameters(SamplingParams()),
        RowSampling.from_parameters(SamplingParams(do_sample=True, seed=5)),
        RowSampling.from_parameters(SamplingParams(temperature=0)),
    ]
    chosen, invalid = TokenChooser(rows, torch.device("cpu")).choose(logits, torch.zeros(3, VOCAB, dtype=torch.bool))
    assert chosen[0] == logits[0].argmax() and chosen[2] == logits[2].argmax()
    assert not invalid.any()


def test_a_seeded_row_samples_the_same_whatever_its_batch_mates(logits):
    target = SamplingParams(do_sample=True, top_k=20, seed=1234)
    alone = TokenChooser([RowSampling.from_parameters(target)], torch.device("cpu"))
    mates = [SamplingParams(do_sample=True, seed=9), target, SamplingParams()]
    batched = TokenChooser([RowSampling.from_parameters(p) for p in mates], torch.device("cpu"))
    seen = torch.zeros(3, VOCAB, dtype=torch.bool)
    alone_tokens = [int(alone.choose(logits[1:2], seen[:1])[0][0]) for _ in range(10)]
    batched_tokens = [int(batched.choose(logits, seen)[0][1]) for _ in range(10)]
    assert alone_tokens == batched_tokens
    assert len(set(alone_tokens)) > 1  # it really sampled


def test_sampling_without_a_seed_picks_and_reports_one():
    row = RowSampling.from_parameters(SamplingParams(do_sample=True))
    assert row.seed is not None and 0 <= row.seed < 2**63
    assert RowSampling.from_parameters(SamplingParams()).seed is None


def test_the_counter_stream_is_a_function_of_seed_and_draw_and_spreads_evenly():
    from worker.engine.sampling import uniforms

    seeds = torch.tensor([1, 2**62 + 7, 1], dtype=torch.long)
    draws = torch.tensor([0, 0, 1], dtype=torch.long)
    first, again = uniforms(seeds, draws), uniforms(seeds, draws)
    assert torch.equal(first, again) and len(set(first.tolist())) == 3  # seed and draw number both matter
    many = uniforms(torch.full((20000,), 1234, dtype=torch.long), torch.arange(20000))
    assert ((many >= 0) & (many < 1)).all()
    counts = torch.histc(many.float(), bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 200  # ~4.5 standard deviations of a fair bin


def test_drawing_for_all_rows_at_once_follows_each_row_s_distribution():
    from worker.engine.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0, 1.0]])
    u = torch.linspace(0, 1, 4001, dtype=torch.float64)[:-1]
    picked = torch.stack([draw(probs, torch.stack([x, x])) for x in u])
    assert set(picked[:, 0].tolist()) == {1, 3, 4} and set(picked[:, 1].tolist()) == {4}  # never a 0-probability token
    share = torch.bincount(picked[:, 0], minlength=5).double() / len(u)
    assert torch.allclose(share, probs[0].double(), atol=1e-3)


def test_a_full_vocabulary_sort_runs_only_on_the_rows_that_need_it(logits, monkeypatch):
    import worker.engine.sampling as sampling

    shapes = []
    real = sampling._top_p
    monkeypatch.setattr(sampling, "_top_p", lambda scores, p: shapes.append(tuple(scores.shape)) or real(scores, p))
    rows = [RowSampling.from_parameters(SamplingParams()),
            RowSampling.from_parameters(SamplingParams(do_sample=True, seed=3)),
            RowSampling.from_parameters(SamplingParams(do_sample=True, top_p=0.5, seed=4))]
    chooser = TokenChooser(rows, torch.device("cpu"))
    tokens, invalid = chooser.choose(logits, torch.zeros(3, VOCAB, dtype=torch.bool))
    assert shapes == [(1, VOCAB)]  # the top_p row alone: not the greedy row, not the plain sampling row
    assert tokens[0] == logits[0].argmax() and not invalid.any()
    kept = _top_p(logits[2:3], torch.tensor([[0.5]]))
    assert torch.isfinite(kept[0, tokens[2]])  # the top_p row drew from its nucleus

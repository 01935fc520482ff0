"""Incremental text: what each new token adds, stop sequences, and bounded work on broken byte streams."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from worker.engine.params import SamplingParams
from worker.engine.sampling import RowSampling
from worker.engine.sequence import Sequence
from worker.engine.text import HOLD_LIMIT, TextTracker


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _sequence(stop: list[str] | None = None) -> Sequence:
    params = SamplingParams(max_new_tokens=4000, stop=stop or [])
    return Sequence(prompt="", params=params, prompt_ids=[1], max_new_tokens=4000,
                    sampling=RowSampling.from_parameters(params), stop=list(params.stop), eos_token_ids=frozenset())


def _feed(tracker: TextTracker, seq: Sequence, ids: list[int]) -> list[int]:
    """Add the ids one by one; the positions at which a stop sequence was reported."""
    hits = []
    for i, token in enumerate(ids):
        seq.tokens.append(token)
        if tracker.add(seq, token):
            hits.append(i)
    return hits


def test_the_incremental_text_is_the_final_text_so_far(tokenizer):
    tracker = TextTracker(tokenizer)
    rng = random.Random(7)
    for _ in range(200):
        seq = _sequence()
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        _feed(tracker, seq, ids)
        final = tracker.final(seq, cut_at_stop=False)
        assert final.startswith(seq.text) and len(final) - len(seq.text) <= 4 * HOLD_LIMIT


def test_a_stop_sequence_is_found_across_token_boundaries(tokenizer):
    tracker = TextTracker(tokenizer)
    ids = tokenizer("Once upon a time there was a robot named Bo").input_ids
    text = tokenizer.decode(ids)
    stop = text[10:17]
    seq = _sequence([stop])
    hits = _feed(tracker, seq, ids)
    assert hits, (text, stop)
    first = hits[0]
    assert stop in tokenizer.decode(ids[: first + 1]) and stop not in tokenizer.decode(ids[:first])
    assert tracker.final(seq, cut_at_stop=True) == text[: text.index(stop)]


def test_bytes_that_never_make_a_character_are_let_through_and_the_held_text_stays_short(tokenizer):
    # Tokens whose text alone is an unfinished character: fed in a row, the text ends half-way through
    # a character after every one of them, as a random model's output often does.
    broken = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"]
    assert broken
    tracker = TextTracker(tokenizer)
    seq = _sequence(["never"])
    ids = [broken[i % len(broken)] for i in range(400)]
    _feed(tracker, seq, ids)
    final = tracker.final(seq, cut_at_stop=False)
    assert final.startswith(seq.text) and len(final) - len(seq.text) <= 4 * HOLD_LIMIT
    assert len(seq.text) >= len(final) // 2  # let through as it went, not held to the end
    assert seq.held < HOLD_LIMIT

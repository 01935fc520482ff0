"""Lengths a request can force: ``min_new_tokens`` holds back the end-of-text token and stop sequences (as
transformers' ``generate`` does), ``ignore_eos`` goes past the end-of-text token (as vLLM does)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from config.models import resolve_model
from worker.engine.core import Engine
from worker.engine.faults import RequestValidationError
from worker.engine.outputs import FinishReason
from worker.engine.params import SamplingParams
from worker.model.loading import load_model, pick_device

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    spec = resolve_model(str(tiny_model_dir))
    eng = Engine(load_model(spec, pick_device("cpu"), "float32"), spec)  # compared with fp32 generate
    # A random model seldom ends its text: make the token greedy decoding picks first the end-of-text
    # token, so that every request below would end after one token unless held back.
    eng.first_token = _greedy_ids(eng, max_new_tokens=1)[0]
    eng.eos_token_ids = frozenset({eng.first_token})
    yield eng
    eng.stop()


def _greedy_ids(engine: Engine, **kwargs) -> list[int]:
    ids = engine.tokenizer(PROMPT, return_tensors="pt").input_ids
    out = engine.model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_the_end_of_text_token_ends_a_request_without_a_minimum(engine):
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=20)).output
    assert (out.generated_tokens, out.finish_reason) == (1, FinishReason.EOS_TOKEN)


def test_min_new_tokens_holds_the_end_of_text_token_back_as_generate_does(engine):
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=20, min_new_tokens=6)).output
    expected = _greedy_ids(engine, max_new_tokens=20, min_new_tokens=6, eos_token_id=engine.first_token)
    assert out.generated_tokens == len(expected) >= 6
    assert out.generated_text == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_ignore_eos_generates_every_token_asked_for(engine):
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=12, ignore_eos=True)).output
    assert (out.generated_tokens, out.finish_reason) == (12, FinishReason.LENGTH)


def test_a_stop_sequence_inside_the_minimum_does_not_end_the_text(engine):
    # With ignore_eos the end-of-text token is an ordinary one: the same tokens with or without a minimum.
    base = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = engine.generate(PROMPT, replace(base, details=True)).output
    stop = plain.generated_text[2:4]  # early in the text: within its first tokens
    assert stop
    early = engine.generate(PROMPT, replace(base, stop=[stop])).output
    assert early.finish_reason == FinishReason.STOP_SEQUENCE and early.generated_tokens < 20
    held = engine.generate(PROMPT, replace(base, stop=[stop], min_new_tokens=20)).output
    assert held.generated_tokens >= 20
    # Cut only at a stop sequence that ends after the first 20 tokens' text, if one came.
    ids = [token.id for token in plain.details.tokens]
    minimum_text = engine.tokenizer.decode(ids[:20], skip_special_tokens=True)
    later = plain.generated_text.find(stop, max(0, len(minimum_text) - len(stop) + 1))
    assert held.generated_text == (plain.generated_text if later < 0 else plain.generated_text[:later])
    assert held.finish_reason == (FinishReason.LENGTH if later < 0 else FinishReason.STOP_SEQUENCE)


def test_a_minimum_over_the_maximum_is_refused_naming_the_field(engine):
    with pytest.raises(RequestValidationError, match="parameters.min_new_tokens"):
        engine.generate(PROMPT, SamplingParams(max_new_tokens=4, min_new_tokens=5))

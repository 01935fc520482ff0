"""Token details from the engine: log-probabilities equal the model's own log-softmax for the same tokens."""

from __future__ import annotations

import pytest
import torch

from tests.worker.engine.test_batching import PROMPTS, loaded, make_engine, params  # noqa: F401


@pytest.fixture(scope="module")
def engine(loaded):  # noqa: F811
    eng = make_engine(loaded, max_batch_size=8)
    yield eng
    eng.stop()


def _model_logprobs(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_token_prompt_and_top_logprobs_match_the_models_log_softmax(engine):
    prompt = PROMPTS[0]
    asked = engine.submit(prompt, params(max_new_tokens=12, details=True, top_n_tokens=3, decoder_input_details=True))
    plain = engine.submit(PROMPTS[1], params(max_new_tokens=12))  # batched with it, asks for nothing
    assert asked.done.wait(60) and plain.done.wait(60)
    out = engine.result(asked).output
    assert engine.result(plain).output.details is None
    prompt_ids = engine.tokenizer(prompt).input_ids
    generated = [t.id for t in out.details.tokens]
    assert len(generated) == out.generated_tokens == 12
    logprobs = _model_logprobs(engine, prompt_ids + generated)
    for i, token in enumerate(out.details.tokens):
        position = len(prompt_ids) + i - 1  # the scores that chose this token
        assert token.logprob == pytest.approx(float(logprobs[position, token.id]), abs=1e-4)
        best = logprobs[position].topk(3)
        assert [t.id for t in out.details.top_tokens[i]] == best.indices.tolist()
        assert out.details.top_tokens[i][0].id == token.id  # greedy: the chosen token is the best one
    assert [t.id for t in out.details.prefill] == prompt_ids
    assert out.details.prefill[0].logprob is None
    for i, token in enumerate(out.details.prefill[1:], start=1):
        assert token.logprob == pytest.approx(float(logprobs[i - 1, token.id]), abs=1e-4)
    assert out.prompt_tokens == len(prompt_ids)


def test_details_leave_the_text_unchanged(engine):
    with_details = engine.generate(PROMPTS[2], params(max_new_tokens=20, details=True)).output
    without = engine.generate(PROMPTS[2], params(max_new_tokens=20)).output
    assert with_details.generated_text == without.generated_text


def test_truncate_keeps_only_the_prompts_last_tokens(engine):
    long_prompt = " ".join(["word"] * 40) + " " + PROMPTS[0]
    last = engine.tokenizer(long_prompt).input_ids[-6:]
    truncated = engine.generate(long_prompt, params(max_new_tokens=10, truncate=6)).output
    alone = engine.generate(engine.tokenizer.decode(last), params(max_new_tokens=10)).output
    assert truncated.prompt_tokens == 6
    assert truncated.generated_text == alone.generated_text

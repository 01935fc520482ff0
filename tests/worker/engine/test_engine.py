"""The engine on a real (tiny, random) BLOOM checkpoint, against transformers' generate."""

from dataclasses import replace

import pytest
import torch

from config.models import resolve_model
from worker.engine.core import Engine
from worker.engine.faults import RequestValidationError
from worker.engine.params import SamplingParams
from worker.model.loading import load_model, pick_device

PROMPTS = ["Once upon a time", "从前有一座山", "كان يا ما كان", "def fibonacci(n):", "x"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    spec = resolve_model(str(tiny_model_dir))
    return Engine(load_model(spec, pick_device("cpu"), "float32"), spec)  # compared with fp32 generate


def _reference(engine: Engine, prompt: str, **kwargs) -> tuple[str, int]:
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    out = engine.model.generate(ids, do_sample=False, **kwargs)[0, ids.shape[1] :]
    return engine.tokenizer.decode(out, skip_special_tokens=True), len(out)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 40}, {"max_new_tokens": 40, "repetition_penalty": 2.0}, {"max_length": 120, "repetition_penalty": 1.3}],
)
def test_greedy_text_equals_model_generate(engine, prompt, kwargs):
    expected, n_tokens = _reference(engine, prompt, **kwargs)
    result = engine.generate(prompt, SamplingParams(**kwargs))
    assert result.output.generated_text == expected
    assert result.output.generated_tokens == n_tokens


def test_tutorial_parameters_give_greedy_with_repetition_penalty(engine):
    params = SamplingParams(max_length=200, top_k=1, temperature=0, repetition_penalty=2.0, seed=2024)
    result = engine.generate("Hello", params)
    expected, _ = _reference(engine, "Hello", max_length=200, repetition_penalty=2.0)
    assert result.output.generated_text == expected
    assert result.output.seed == 2024


def test_output_is_not_degenerate(engine):
    result = engine.generate("Once upon a time", SamplingParams(max_new_tokens=30))
    ids = engine.tokenizer(result.output.generated_text).input_ids
    assert len(set(ids)) > 5  # a wide init: equality tests above compare real, varied sequences


def test_seeded_sampling_is_reproducible_and_seed_matters(engine):
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=30)
    a = engine.generate("Hello", replace(params, seed=1)).output
    b = engine.generate("Hello", replace(params, seed=1)).output
    c = engine.generate("Hello", replace(params, seed=2)).output
    assert a.generated_text == b.generated_text
    assert a.generated_text != c.generated_text


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    full = engine.generate("Once upon a time", SamplingParams(max_new_tokens=40)).output
    stop = full.generated_text[10:13]
    assert stop and stop in full.generated_text
    cut = engine.generate("Once upon a time", SamplingParams(max_new_tokens=40, stop=[stop])).output
    assert cut.finish_reason.value == "stop_sequence"
    assert cut.generated_text == full.generated_text[: full.generated_text.index(stop)]
    assert cut.generated_tokens < full.generated_tokens


def test_return_full_text_prepends_the_prompt(engine):
    prompt = "مرحبا 你好"
    plain = engine.generate(prompt, SamplingParams(max_new_tokens=5)).output
    full = engine.generate(prompt, SamplingParams(max_new_tokens=5, return_full_text=True)).output
    assert full.generated_text == prompt + plain.generated_text


def test_length_finish_reason_and_token_count(engine):
    out = engine.generate("Hello", SamplingParams(max_new_tokens=7)).output
    assert out.finish_reason.value == "length" and out.generated_tokens == 7


def test_max_length_shorter_than_the_prompt_is_a_validation_error(engine):
    with pytest.raises(RequestValidationError, match="max_length"):
        engine.generate("Once upon a time there was", SamplingParams(max_length=2))


def test_prompt_over_the_model_limit_is_a_validation_error(engine):
    small = Engine.__new__(Engine)
    small.__dict__.update(engine.__dict__)
    small.spec = replace(engine.spec, max_input_tokens=3)
    with pytest.raises(RequestValidationError, match="at most 3"):
        small.generate("Once upon a time there was a robot", SamplingParams(max_new_tokens=2))


def test_a_seed_replays_the_same_text_run_after_run(engine):
    # Each run's sequence is freed before the next starts, so Python may give the next one the same id():
    # nothing of a finished sequence (its sampler, its place in its random stream) may carry over.
    params = SamplingParams(do_sample=True, temperature=1.5, max_new_tokens=12, seed=7)
    texts = {engine.generate("Hello", params).output.generated_text for _ in range(12)}
    assert len(texts) == 1

"""Property: nothing the request schema accepts can make a batch's token choice raise or give no valid
token, whatever the scores (hypothesis over the whole accepted parameter space)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.schema import MAX_SEED, GenerateParameters
from worker.engine.params import SamplingParams
from worker.engine.sampling import RowSampling, TokenChooser
from worker.runner import engine_params

VOCAB = 97
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
edges = st.sampled_from([0.0, 1e-300, 1e-45, 1e-6, 1e-4, 0.01, 0.5, 1.0, 2.0, 100.0, 1e300])


def raw_parameters() -> st.SearchStrategy[dict]:
    """Anything a client might send, valid or not; the schema decides what gets through."""
    number = st.one_of(floats, edges)
    fields = {
        "do_sample": st.one_of(st.none(), st.booleans()),
        "temperature": st.one_of(st.none(), number),
        "top_k": st.one_of(st.none(), st.integers(min_value=-5, max_value=2**70)),
        "top_p": st.one_of(st.none(), number),
        "typical_p": st.one_of(st.none(), number),
        "repetition_penalty": st.one_of(st.none(), number),
        "seed": st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_SEED + 5)),
    }
    return st.fixed_dictionaries({}, optional=fields)


def _validated(raw: dict) -> SamplingParams | None:
    """The parameters the job schema accepts, as the worker hands them to the engine."""
    try:
        return engine_params(GenerateParameters.model_validate({**raw, "max_new_tokens": 4}).normalised(4))
    except ValidationError:
        return None


# What the schema lets through, row by row: a refused row is drawn again on its own (not the whole example,
# scores included), so the search spends its time on accepted parameters.
accepted_rows = raw_parameters().map(_validated).filter(lambda params: params is not None)


@st.composite
def scores(draw) -> torch.Tensor:
    """[4, VOCAB] float32 scores: uniform in +-scale from a drawn seed (drawing 388 floats one by one would
    take most of the test's time), with drawn positions pinned to the extremes and to ties."""
    generator = torch.Generator().manual_seed(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    logits = (torch.rand((4, VOCAB), generator=generator) * 2 - 1) * scale
    pinned = draw(st.lists(st.tuples(st.integers(min_value=0, max_value=4 * VOCAB - 1),
                                     st.sampled_from([-1e4, 0.0, 1e4])), max_size=40))
    for index, value in pinned:
        logits.view(-1)[index] = value
    if draw(st.booleans()):
        logits[:, : draw(st.integers(min_value=2, max_value=VOCAB))] = scale  # a wide tie for the top
    return logits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(params=st.lists(accepted_rows, min_size=1, max_size=4), logits=scores(),
       seen_ids=st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=20))
def test_no_accepted_parameters_make_token_choice_raise(params, logits, seen_ids):
    chooser = TokenChooser([RowSampling.from_parameters(p) for p in params], torch.device("cpu"))
    batch_logits = logits[: len(params)]
    seen = torch.zeros((len(params), VOCAB), dtype=torch.bool)
    seen[:, seen_ids] = True
    for _ in range(3):  # several steps: the row generators move on
        tokens, invalid = chooser.choose(batch_logits, seen)
        assert not invalid.any(), params
        assert ((tokens >= 0) & (tokens < VOCAB)).all()


@given(raw=raw_parameters())
def test_every_accepted_number_is_finite_and_inside_its_documented_bounds(raw):
    try:
        params = GenerateParameters.model_validate({**raw, "max_new_tokens": 4})
    except ValidationError:
        return
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty"):
        value = getattr(params, name)
        assert value is None or (value == value and abs(value) != float("inf"))
    assert params.temperature is None or params.temperature == 0 or 1e-4 <= params.temperature <= 100
    assert params.top_k is None or 1 <= params.top_k <= 250_880

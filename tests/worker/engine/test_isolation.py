"""A request that cannot be served fails alone: per-row faults in the engine, on a real tiny BLOOM.

The hostile requests here are the engine's own parameters, which it takes unvalidated, as if the job schema
had let them through: the engine must still fail only them, and every other row must finish with the same text
as ``model.generate`` without starting over.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from tests.worker.engine.test_batching import PROMPTS, loaded, make_engine, params, reference  # noqa: F401
from worker.engine import flex
from worker.engine.capacity import EngineConfig
from worker.engine.core import Engine
from worker.engine.faults import DeviceFault, GenerationError
from worker.engine.params import SamplingParams
from worker.engine.triage import MAX_RESTARTS

NEW_TOKENS = 30

# name: (fields, whether the request must fail; the others are odd but still servable)
HOSTILE = {
    "temperature rounding to 0 in float32": ({"do_sample": True, "temperature": 1e-45}, True),
    "NaN repetition penalty": ({"repetition_penalty": float("nan")}, True),
    "NaN temperature": ({"do_sample": True, "temperature": float("nan")}, True),
    "top_k overflowing a long tensor": ({"do_sample": True, "top_k": 2**64}, True),
    "negative top_p": ({"do_sample": True, "top_p": -1.0}, False),
    "infinite repetition penalty": ({"repetition_penalty": float("inf")}, False),
}


def hostile(**fields) -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, stop=[], return_full_text=False, **fields)


class Wrapped:
    """Wraps the engine's paged model (``engine.paged``) to inject faults into its forward passes.

    ``forward`` gets the pass's chunks; ``rows(chunks)`` names the sequence of each, so a fault can pick its
    victim by prompt."""

    def __init__(self, eng) -> None:
        self.eng = eng
        self.paged = eng.paged
        eng.paged = self

    def rows(self, chunks):
        by_table = {id(seq.table): seq for seq in self.eng.running}
        return [by_table.get(id(chunk.table)) for chunk in chunks]

    def forward(self, chunks):
        return self.paged.forward(chunks)

    def __getattr__(self, name):  # everything else (idle, close, ...) is the paged model's
        return getattr(self.paged, name)


def decoding(chunks) -> bool:
    """A pass of decoding rows only (one token each)."""
    return all(len(chunk.tokens) == 1 for chunk in chunks)


def only_one_fails(eng, culprit_prompt: str, error: str) -> None:
    """Run four jobs together: the culprit's fails with ``error``; the others match generate, never restarted."""
    try:
        seqs = [eng.submit(p, params(max_new_tokens=NEW_TOKENS)) for p in PROMPTS[:4]]
        for seq, prompt in zip(seqs, PROMPTS, strict=False):
            assert seq.done.wait(60)
            if prompt == culprit_prompt:
                with pytest.raises(GenerationError, match=error):
                    eng.result(seq)
                continue
            assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=NEW_TOKENS)
            assert seq.restarts == 0
    finally:
        eng.stop()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_row_fails_alone_and_its_batch_mates_finish_unchanged(loaded, case):
    eng = make_engine(loaded, max_batch_size=8)
    try:
        ordinary = [eng.submit(p, params(max_new_tokens=NEW_TOKENS)) for p in PROMPTS[:4]]
        while eng.steps < 3:  # the ordinary rows are decoding when the hostile one joins
            pass
        fields, must_fail = HOSTILE[case]
        bad = eng.submit(PROMPTS[4], hostile(**fields))
        assert bad.done.wait(60)
        if must_fail:
            with pytest.raises(GenerationError, match="alone"):
                eng.result(bad)
        else:
            assert eng.result(bad).output.generated_tokens >= 1
        for seq, prompt in zip(ordinary, PROMPTS, strict=False):
            assert seq.done.wait(60)
            assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=NEW_TOKENS)
            assert seq.restarts == 0  # never started over from its prompt
        assert eng.generate("still serving", params(max_new_tokens=5)).output.generated_tokens == 5
    finally:
        eng.stop()


def test_non_finite_scores_from_the_model_fail_only_that_row(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    victim_prompt = PROMPTS[1]

    class NaNForOneRow(Wrapped):
        def forward(self, chunks):
            out = super().forward(chunks)
            for seq, logits in zip(self.rows(chunks), out, strict=True):
                if seq is not None and seq.prompt == victim_prompt and len(seq.tokens) >= 5 and logits is not None:
                    logits.fill_(float("nan"))
            return out

    NaNForOneRow(eng)
    only_one_fails(eng, victim_prompt, "not finite")


def test_a_decode_step_that_raises_is_probed_row_by_row_and_only_the_culprit_fails(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    culprit_prompt = PROMPTS[2]

    class BadTensorForOneRow(Wrapped):
        def forward(self, chunks):
            if any(seq is not None and seq.prompt == culprit_prompt and len(seq.tokens) >= 4
                   for seq in self.rows(chunks)):
                # In a pass with others, and alone when probed: only the culprit's own chunk fails alone.
                raise RuntimeError("index out of range in self (a bad tensor)")
            return super().forward(chunks)

    BadTensorForOneRow(eng)
    only_one_fails(eng, culprit_prompt, "bad tensor")


def test_a_failure_that_never_clears_ends_every_job_instead_of_retrying_forever(loaded):
    eng = make_engine(loaded, max_batch_size=8)

    class AlwaysBroken(Wrapped):
        def forward(self, chunks):
            if decoding(chunks):
                raise RuntimeError("the step always fails")
            return super().forward(chunks)

    AlwaysBroken(eng)
    try:
        seqs = [eng.submit(p, params(max_new_tokens=NEW_TOKENS)) for p in PROMPTS[:4]]
        for seq in seqs:
            assert seq.done.wait(120)
            with pytest.raises(GenerationError):
                eng.result(seq)
            assert seq.restarts <= MAX_RESTARTS
    finally:
        eng.stop()


def test_any_of_several_eos_ids_ends_generation(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    try:
        ids = eng.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        with torch.inference_mode():
            free = eng.model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)[0, ids.shape[1] :].tolist()
        stop_at = next(i for i, token in enumerate(free) if i >= 3 and token not in free[:i])
        eng.eos_token_ids = frozenset([2, free[stop_at]])  # generation_config.eos_token_id given as a list
        out = eng.generate(PROMPTS[0], params(max_new_tokens=NEW_TOKENS)).output
        assert out.finish_reason.value == "eos_token"
        assert out.generated_tokens == stop_at + 1
    finally:
        eng.stop()


def test_list_eos_in_the_generation_config_is_read_as_a_set(loaded):
    spec, model = loaded
    saved = model.model.generation_config.eos_token_id
    model.model.generation_config.eos_token_id = [2, 7]
    try:
        eng = make_engine(loaded)
        assert eng.eos_token_ids == frozenset({2, 7})
    finally:
        model.model.generation_config.eos_token_id = saved


def test_an_isolated_request_never_shares_a_step(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    shared = []

    class Watch(Wrapped):
        def forward(self, chunks):
            if any(seq is not None and seq.isolated for seq in self.rows(chunks)):
                shared.append(len(chunks))
            return super().forward(chunks)

    Watch(eng)
    try:
        first = eng.submit(PROMPTS[0], params(max_new_tokens=NEW_TOKENS))
        suspect = eng.submit(PROMPTS[1], params(max_new_tokens=NEW_TOKENS), isolated=True)
        later = [eng.submit(p, params(max_new_tokens=NEW_TOKENS)) for p in PROMPTS[2:4]]
        for seq, prompt in zip([first, suspect, *later], PROMPTS, strict=False):
            assert seq.done.wait(60)
            assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=NEW_TOKENS)
        assert shared and set(shared) == {1}
    finally:
        eng.stop()


def test_a_fatal_device_error_hands_over_and_stops_the_engine(loaded):
    faults = []
    spec, model = loaded
    eng = Engine(model, spec, EngineConfig(max_batch_size=8), on_fatal=faults.append)

    class DeviceAssert(Wrapped):
        def forward(self, chunks):
            if decoding(chunks):
                raise RuntimeError("CUDA error: device-side assert triggered")
            return super().forward(chunks)

    DeviceAssert(eng)
    try:
        eng.submit(PROMPTS[0], params(max_new_tokens=NEW_TOKENS))
        eng._thread.join(30)
        assert not eng._thread.is_alive()
        assert len(faults) == 1 and "device-side assert" in str(faults[0])
        with pytest.raises(DeviceFault):
            eng.submit(PROMPTS[1], params(max_new_tokens=5))
    finally:
        eng.stop()


def test_under_flexattention_a_failed_rows_own_blocks_are_cleared_before_another_row_gets_them(loaded, monkeypatch):
    # FlexAttention's kernel may read slots next to a row's own with a weight of zero, and 0 * NaN is NaN:
    # what a failed row leaves in its blocks is cleared (uncompiled here: the same masks and scores).
    monkeypatch.setattr(flex, "compiled_kernel", lambda: flex_attention)
    eng = make_engine(loaded, max_batch_size=8, attention="flex", max_batch_slots=1024)
    assert eng.paged.attention == "flex"
    victim_prompt, held = PROMPTS[1], []

    class NaNForOneRow(Wrapped):
        def forward(self, chunks):
            out = super().forward(chunks)
            for seq, logits in zip(self.rows(chunks), out, strict=True):
                if seq is not None and seq.prompt == victim_prompt and len(seq.tokens) >= 5 and logits is not None:
                    held[:] = seq.table
                    for pool in (*eng.kv.keys, *eng.kv.values):  # as a row that overflowed would leave them
                        pool[seq.table[0] * eng.kv.block_size] = float("nan")
                    logits.fill_(float("nan"))
            return out

    NaNForOneRow(eng)
    cleared = []
    retire = eng._retire

    def noted_retire(seq, reason=None, error=None):
        retire(seq, reason, error)
        if seq.prompt == victim_prompt:  # before any other row can be given the blocks
            size = eng.kv.block_size
            cleared.append(all(pool[block * size : (block + 1) * size].eq(0).all()
                               for pool in (*eng.kv.keys, *eng.kv.values) for block in held))

    eng._retire = noted_retire
    only_one_fails(eng, victim_prompt, "not finite")
    assert held and cleared == [True]

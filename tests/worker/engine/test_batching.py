"""Continuous batching on a real tiny BLOOM: every job's tokens equal a standalone generate()."""

from __future__ import annotations

import pytest
import torch

from config.models import resolve_model
from tests.support import wait_for
from worker.engine.capacity import EngineConfig
from worker.engine.core import Engine
from worker.engine.faults import OutOfMemory
from worker.engine.params import SamplingParams
from worker.model.loading import load_model, pick_device

PROMPTS = [
    "Once upon a time there was a little robot",
    "从前有一座山",
    "كان يا ما كان في قديم الزمان رجل حكيم",
    "def fibonacci(n):",
    "x",
    "The quick brown fox jumps over the lazy dog. The dog did not mind.",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    spec = resolve_model(str(tiny_model_dir))
    return spec, load_model(spec, pick_device("cpu"), "float32")  # compared with fp32 generate


def make_engine(loaded, **config) -> Engine:
    spec, model = loaded
    return Engine(model, spec, EngineConfig(**config))


@pytest.fixture()
def engine(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    yield eng
    eng.stop()


def reference(engine: Engine, prompt: str, **kwargs) -> str:
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = engine.model.generate(ids, do_sample=False, **kwargs)
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def params(**kwargs) -> SamplingParams:
    if "max_length" not in kwargs:
        kwargs.setdefault("max_new_tokens", 64)
    return SamplingParams(**kwargs)


def test_jobs_submitted_together_batch_and_match_generate(engine):
    lengths = [40, 7, 25, 60, 3, 33]
    seqs = [
        engine.submit(p, params(max_new_tokens=n, repetition_penalty=1.3)) for p, n in zip(PROMPTS, lengths)
    ]
    for seq, prompt, n in zip(seqs, PROMPTS, lengths, strict=True):
        assert seq.done.wait(60)
        text = engine.result(seq).output.generated_text
        assert text == reference(engine, prompt, max_new_tokens=n, repetition_penalty=1.3)
    assert max(engine.batch_sizes) > 1  # they really shared steps


def test_jobs_joining_mid_flight_match_generate(engine):
    first = engine.submit(PROMPTS[0], params(max_new_tokens=120))
    wait_for(lambda: engine.steps >= 10, timeout=60, interval=0.001, what="ten steps of the first job")
    later = []
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        later.append((prompt, 5 + 9 * i, engine.submit(prompt, params(max_new_tokens=5 + 9 * i))))
        steps = engine.steps
        wait_for(lambda: engine.steps >= steps + 3 or first.done.is_set(), timeout=60, interval=0.001,
                 what="three more steps")
    assert first.done.wait(60)
    assert engine.result(first).output.generated_text == reference(engine, PROMPTS[0], max_new_tokens=120)
    for prompt, n, seq in later:
        assert seq.done.wait(60)
        assert engine.result(seq).output.generated_text == reference(engine, prompt, max_new_tokens=n)
    assert max(engine.batch_sizes) > 1


def test_a_short_job_does_not_wait_for_a_long_one(engine):
    long = engine.submit(PROMPTS[0], params(max_new_tokens=800))
    wait_for(lambda: engine.steps >= 5, timeout=60, interval=0.001, what="five steps of the long job")
    short = engine.submit(PROMPTS[1], params(max_new_tokens=5))
    assert short.done.wait(30)
    assert not long.done.is_set()  # the short one left the batch while the long one kept going
    assert long.done.wait(120)


def test_seeded_sampling_gives_the_same_text_alone_or_batched(loaded):
    sampled = params(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=31, max_new_tokens=30)
    alone_engine = make_engine(loaded, max_batch_size=1)
    alone = alone_engine.generate("Hello there", sampled).output.generated_text
    alone_engine.stop()
    batched_engine = make_engine(loaded, max_batch_size=8)
    mates = [batched_engine.submit(p, params(do_sample=True, seed=i, max_new_tokens=20)) for i, p in enumerate(PROMPTS)]
    target = batched_engine.submit("Hello there", sampled)
    assert target.done.wait(60) and all(m.done.wait(60) for m in mates)
    assert batched_engine.result(target).output.generated_text == alone
    assert max(batched_engine.batch_sizes) > 1
    batched_engine.stop()


def test_batch_size_one_runs_jobs_one_at_a_time(loaded):
    eng = make_engine(loaded, max_batch_size=1)
    seqs = [eng.submit(p, params(max_new_tokens=10)) for p in PROMPTS[:4]]
    assert all(s.done.wait(60) for s in seqs)
    assert set(eng.batch_sizes) == {1}
    eng.stop()


def test_a_small_block_pool_makes_jobs_take_turns_and_every_job_still_matches(loaded):
    # 5 blocks of 16 slots: each of these jobs needs 3 at its longest, so they cannot all run at once.
    eng = make_engine(loaded, max_batch_size=8, max_batch_slots=5 * 16)
    seqs = [eng.submit(p, params(max_new_tokens=30)) for p in PROMPTS]
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        assert seq.done.wait(60)
        assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=30)
    assert sum(seq.preemptions for seq in seqs) > 0  # rows gave their blocks back and came back later
    assert max(eng.batch_sizes) > 1 and eng.pool.held == 0
    eng.stop()


class OOMAbove:
    """Wraps the engine's paged model: raises CUDA-style out-of-memory when a pass has too many rows or a
    row reaches too many positions."""

    def __init__(self, paged, max_rows: int, max_columns: int = 10_000) -> None:
        self.paged, self.max_rows, self.max_columns = paged, max_rows, max_columns
        self.ooms = 0

    def forward(self, chunks):
        if len(chunks) > self.max_rows or any(chunk.end > self.max_columns for chunk in chunks):
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.paged.forward(chunks)

    def __getattr__(self, name):  # everything else (idle, close, ...) is the paged model's
        return getattr(self.paged, name)


def test_out_of_memory_splits_the_batch_and_every_job_still_matches(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    eng.paged = OOMAbove(eng.paged, max_rows=2)
    seqs = [eng.submit(p, params(max_new_tokens=20)) for p in PROMPTS]
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        assert seq.done.wait(60)
        assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=20)
    assert eng.paged.ooms > 0
    eng.stop()


def test_a_job_too_big_even_alone_fails_clearly_and_the_rest_are_served(loaded):
    eng = make_engine(loaded, max_batch_size=8)
    eng.paged = OOMAbove(eng.paged, max_rows=8, max_columns=200)
    big = eng.submit(PROMPTS[0], params(max_new_tokens=400))
    small = [eng.submit(p, params(max_new_tokens=15)) for p in PROMPTS[1:]]
    assert big.done.wait(60)
    with pytest.raises(OutOfMemory, match="alone"):
        eng.result(big)
    for seq, prompt in zip(small, PROMPTS[1:], strict=True):
        assert seq.done.wait(60)
        assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=15)
    after = eng.generate("still serving", params(max_new_tokens=5))
    assert after.output.generated_tokens == 5
    eng.stop()


def test_stop_sequences_and_eos_per_row_in_one_batch(engine):
    full = engine.generate(PROMPTS[0], params(max_new_tokens=30)).output.generated_text
    stop = full[5:8]
    a = engine.submit(PROMPTS[0], params(max_new_tokens=30, stop=[stop]))
    b = engine.submit(PROMPTS[0], params(max_new_tokens=30))
    assert a.done.wait(30) and b.done.wait(30)
    assert engine.result(a).output.generated_text == full[: full.index(stop)]
    assert engine.result(a).output.finish_reason.value == "stop_sequence"
    assert engine.result(b).output.generated_text == full


def test_cancel_stops_a_running_job_within_one_step_and_spares_its_batch_mates(engine):
    victim = engine.submit(PROMPTS[0], params(max_new_tokens=1500))
    mate = engine.submit(PROMPTS[1], params(max_new_tokens=60))
    wait_for(lambda: len(victim.tokens) >= 20, timeout=60, interval=0.001, what="20 tokens of the victim")
    engine.cancel(victim)
    tokens_when_cancelled = len(victim.tokens)
    assert victim.done.wait(10)
    assert len(victim.tokens) <= tokens_when_cancelled + 1  # within one decode step
    out = engine.result(victim).output
    assert out.finish_reason.value == "canceled" and out.generated_tokens == len(victim.tokens)
    full = reference(engine, PROMPTS[0], max_new_tokens=out.generated_tokens)
    assert full.startswith(out.generated_text) and out.generated_text  # the partial text is kept
    assert mate.done.wait(30)
    assert engine.result(mate).output.generated_text == reference(engine, PROMPTS[1], max_new_tokens=60)


def test_a_cancelled_job_that_has_not_started_never_runs(loaded):
    eng = make_engine(loaded, max_batch_size=1)
    first = eng.submit(PROMPTS[0], params(max_new_tokens=300))
    queued = eng.submit(PROMPTS[1], params(max_new_tokens=300))
    eng.cancel(queued)
    assert queued.done.wait(30) and queued.tokens == [] and queued.finish_reason.value == "canceled"
    assert first.done.wait(30) and first.finish_reason.value == "length"
    eng.stop()


def test_a_job_past_its_deadline_stops_with_timeout_and_keeps_its_text(engine):
    seq = engine.submit(PROMPTS[0], params(max_new_tokens=1900), timeout=0.3)
    assert seq.done.wait(30)
    out = engine.result(seq).output
    assert out.finish_reason.value == "timeout"
    assert 0 < out.generated_tokens < 1900 and out.generated_text


def test_partial_text_holds_back_a_possible_stop_sequence(engine):
    seq = engine.submit(PROMPTS[0], params(max_new_tokens=5, stop=["zzzzzz"]))
    assert seq.done.wait(30)
    full = engine.tokenizer.decode(seq.tokens, skip_special_tokens=True)
    assert engine.partial_text(seq) == full[: len(full) - 5].rstrip("\ufffd")


def test_a_row_gives_its_blocks_back_when_it_ends_and_nothing_of_the_others_moves(engine):
    long_prompt = PROMPTS[5] * 4
    short = engine.submit(PROMPTS[4], params(max_new_tokens=400))
    wide = engine.submit(long_prompt, params(max_new_tokens=3))
    wait_for(lambda: len(short.tokens) >= 2, timeout=60, interval=0.001, what="the short job to decode")
    table = list(short.table)
    assert wide.done.wait(30)
    wait_for(lambda: len(short.tokens) >= 40 or short.done.is_set(), timeout=60, interval=0.001,
             what="40 tokens of the short job")
    assert engine.running == [short]
    assert short.table[: len(table)] == table  # its blocks stayed where they were
    # Only the short job's own blocks are held (the wide one's full blocks may stay cached, but idle). Read
    # in this order, while the engine runs: the job only grows.
    held = engine.pool.held
    assert held <= engine.pool.blocks_for(len(short.ids) + 2) < engine.pool.blocks_for(wide.prompt_len) + held
    assert short.done.wait(60)
    assert engine.result(short).output.generated_text == reference(engine, PROMPTS[4], max_new_tokens=400)


LONG = " ".join(f"line {i}: a sentence to read, in several chunks;" for i in range(12))


def test_prompts_read_in_chunks_while_others_decode_match_generate(loaded):
    eng = make_engine(loaded, max_batch_size=4, step_tokens=16, block_size=8, prefix_caching=False)
    try:
        running = [eng.submit(p, params(max_new_tokens=40)) for p in PROMPTS[:2]]
        wait_for(lambda: all(len(s.tokens) > 2 for s in running), timeout=30, what="the first rows to decode")
        passes_before = eng.prefills
        joined = eng.submit(LONG, params(max_new_tokens=10))
        for seq in [*running, joined]:
            seq.done.wait(60)
        for prompt, seq in zip(PROMPTS[:2], running, strict=True):
            assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=40)
        result = eng.result(joined)
        assert result.output.generated_text == reference(eng, LONG, max_new_tokens=10)
        # Read in chunks of at most 16 tokens (less the decoding rows' share): one pass could not hold it.
        assert eng.prefills - passes_before >= result.prompt_tokens // 16
        assert eng.prefix_counters == {"reused": 0, "computed": eng.scheduler.computed_tokens}
    finally:
        eng.stop()


def test_prompts_sharing_a_prefix_reuse_its_blocks_and_match_generate(loaded):
    eng = make_engine(loaded, max_batch_size=4, step_tokens=32, block_size=8)
    try:
        first = eng.generate(LONG + " first", params(max_new_tokens=8))
        assert first.output.generated_text == reference(eng, LONG + " first", max_new_tokens=8)
        assert eng.prefix_counters["reused"] == 0
        computed = eng.prefix_counters["computed"]
        assert computed == first.prompt_tokens
        second = eng.generate(LONG + " second", params(max_new_tokens=8))
        assert second.output.generated_text == reference(eng, LONG + " second", max_new_tokens=8)
        reused = eng.prefix_counters["reused"]
        ids = [eng.tokenizer(LONG + s).input_ids for s in (" first", " second")]
        common = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
        assert reused == common // 8 * 8 > 0  # every full block of the common prefix, nothing after it
        assert eng.prefix_counters["computed"] - computed == second.prompt_tokens - reused
    finally:
        eng.stop()


def test_a_burst_sharing_a_prefix_computes_it_once(loaded):
    # All four arrive together: the first computes the shared blocks; the others wait the passes that
    # takes, then share them (before, all four computed the whole prefix side by side).
    eng = make_engine(loaded, max_batch_size=4, step_tokens=32, block_size=8, max_wait_seconds=0.2)
    try:
        prompts = [LONG + f" question {i}" for i in range(4)]
        seqs = [eng.submit(p, params(max_new_tokens=6)) for p in prompts]
        for prompt, seq in zip(prompts, seqs, strict=True):
            seq.done.wait(60)
            assert eng.result(seq).output.generated_text == reference(eng, prompt, max_new_tokens=6)
        ids = [eng.tokenizer(p).input_ids for p in prompts]
        common = next(i for i, column in enumerate(zip(*ids, strict=False)) if len(set(column)) > 1)
        shared = common // 8 * 8
        assert eng.prefix_counters["reused"] >= 3 * shared > 0
        assert eng.prefix_counters["computed"] <= sum(map(len, ids)) - 3 * shared
    finally:
        eng.stop()

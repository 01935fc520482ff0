"""The paged engine through the whole stack: prompts read in chunks, shared prefixes computed once.

The shared stack's worker runs with small blocks and a small step budget (8-token blocks, 24 tokens a pass), so the
prompts here span many blocks and many chunks on the tiny checkpoint.
"""

from __future__ import annotations

import re

import requests
from transformers import AutoTokenizer

from tests.e2e.conftest import SHARED_TINY_ENV, Stack
from tests.support import wait_for, wait_for_job

BLOCK, STEP = int(SHARED_TINY_ENV["BLOOMQ_KV_BLOCK_TOKENS"]), int(SHARED_TINY_ENV["BLOOMQ_STEP_TOKENS"])
# About 120 tokens of the tiny tokenizer: several blocks, five or more chunks of STEP.
SHARED = ("You are a careful assistant. Answer in one short sentence, in the language of the question. "
          "Here are the rules of the house: be kind, be brief, be exact, and never invent a fact. ") * 3
QUESTIONS = ["What is the capital of France?", "¿Cuál es la capital de España?", "ما هي عاصمة مصر؟",
             "日本の首都はどこですか？"]


def _worker(stack: Stack) -> dict:
    [worker] = requests.get(f"{stack.url}/api/v1/workers", timeout=5).json()["workers"]
    return worker


def _prompt_tokens(job: dict) -> int:
    return job["output"]["prompt_tokens"]


def test_prompts_sharing_a_prefix_reuse_its_blocks_and_give_the_text_of_a_whole_prefill(stack, reference,
                                                                                          tiny_model_dir):
    stack.wait_until_idle()  # the worker's counters below count this test's prompts only
    start = _worker(stack)
    first = wait_for_job(stack.url, stack.submit(SHARED + QUESTIONS[0], parameters={"max_new_tokens": 12})["id"])
    assert first["status"] == "succeeded", first
    assert _prompt_tokens(first) > 4 * STEP  # read over several passes
    assert first["output"]["generated_text"] == reference(SHARED + QUESTIONS[0], max_new_tokens=12)

    def read_since_start() -> int:
        now = _worker(stack)
        return sum(now[k] - start[k] for k in ("prompt_tokens_computed", "prompt_tokens_reused"))

    wait_for(lambda: read_since_start() >= _prompt_tokens(first), timeout=10,
             what="the heartbeat to report the first prompt")
    before = _worker(stack)

    jobs = [stack.submit(SHARED + q, parameters={"max_new_tokens": 12})["id"] for q in QUESTIONS[1:]]
    done = [wait_for_job(stack.url, job_id) for job_id in jobs]
    for question, job in zip(QUESTIONS[1:], done, strict=True):
        assert job["status"] == "succeeded", job
        assert job["output"]["generated_text"] == reference(SHARED + question, max_new_tokens=12)

    # Each later prompt finds the first one's full blocks up to where their tokens part (never the block
    # holding its own last token: that position is always computed, for the logits).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = tokenizer(SHARED + QUESTIONS[0]).input_ids
    expected_reuse = 0
    for question in QUESTIONS[1:]:
        ids = tokenizer(SHARED + question).input_ids
        common = next((i for i, (a, b) in enumerate(zip(base, ids, strict=False)) if a != b), min(len(base), len(ids)))
        expected_reuse += min(common, len(ids) - 1) // BLOCK * BLOCK
    assert expected_reuse >= len(jobs) * 4 * STEP  # most of each prompt

    def reused() -> int:
        return _worker(stack)["prompt_tokens_reused"] - before["prompt_tokens_reused"]

    wait_for(lambda: reused() >= expected_reuse, timeout=10, what="the heartbeat to report the reused prefix")
    after = _worker(stack)
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    total = sum(_prompt_tokens(job) for job in done)
    assert reused() + computed == total  # every prompt position either shared or computed, once
    assert after["kv_block_tokens"] == BLOCK and after["kv_blocks"] > 0

    metrics = requests.get(f"{stack.url}/metrics", timeout=5).text
    [line] = [ln for ln in metrics.splitlines() if ln.startswith("bloomq_worker_prompt_tokens_reused_total{")]
    assert float(line.rsplit(" ", 1)[1]) == after["prompt_tokens_reused"]
    assert re.search(r"^bloomq_worker_kv_blocks\{.*\} [1-9]", metrics, re.M)


def test_a_long_prompt_joins_running_jobs_in_chunks_and_nobody_s_text_changes(stack, reference):
    short = ["Once upon a time", "def fibonacci(n):"]
    running = [stack.submit(p, parameters={"max_new_tokens": 60})["id"] for p in short]
    long_prompt = " ".join(f"item {i}: the {i}th line of a long list of things to read;" for i in range(10))
    joined = stack.submit(long_prompt, parameters={"max_new_tokens": 10})["id"]
    for prompt, job_id in zip(short, running, strict=True):
        done = wait_for_job(stack.url, job_id)
        assert done["status"] == "succeeded", done
        assert done["output"]["generated_text"] == reference(prompt, max_new_tokens=60)
    done = wait_for_job(stack.url, joined)
    assert done["status"] == "succeeded", done
    assert _prompt_tokens(done) > 10 * STEP
    assert done["output"]["generated_text"] == reference(long_prompt, max_new_tokens=10)

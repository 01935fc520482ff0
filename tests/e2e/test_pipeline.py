"""Submit -> Redis -> Celery worker -> tiny BLOOM -> poll, over real HTTP against real processes."""

from __future__ import annotations

import html
import re
from datetime import datetime

import requests

from tests.support import csrf_token, wait_for_job

PROMPTS = [
    "Once upon a time",
    "从前有一座山，山里有一座庙",
    "كان يا ما كان في قديم الزمان",
    "def fibonacci(n):\n    a, b = 0, 1",
    "Il était une fois un petit chat",
]


def test_jobs_succeed_with_text_equal_to_direct_generate(stack, reference):
    jobs = [stack.submit(p, parameters={"max_new_tokens": 24, "repetition_penalty": 1.2}) for p in PROMPTS]
    for prompt, job in zip(PROMPTS, jobs, strict=True):
        done = wait_for_job(stack.url, job["id"])
        assert done["status"] == "succeeded", done
        assert done["inputs"] == prompt  # multilingual prompts round-trip intact
        assert done["output"]["generated_text"] == reference(prompt, max_new_tokens=24, repetition_penalty=1.2)
        assert done["output"]["finish_reason"] in ("length", "eos_token")
        assert done["worker"].startswith("tiny-bloom@") and done["attempts"] == 1
        assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
        metrics = done["metrics"]
        assert metrics["queue_seconds"] >= 0 and metrics["inference_seconds"] > 0 and metrics["seconds_per_token"] > 0
        end_to_end = (datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["created_at"]))
        assert metrics["queue_seconds"] < metrics["time_to_first_token"] <= end_to_end.total_seconds() + 1e-3


def test_tutorial_parameters_give_greedy_with_repetition_penalty(stack, reference):
    params = {"max_length": 200, "top_k": 1, "temperature": 0, "repetition_penalty": 2.0, "seed": 2024}
    job = stack.submit("This is a creative story about a robot.\n", parameters=params)
    done = wait_for_job(stack.url, job["id"])
    assert done["status"] == "succeeded"
    expected = reference("This is a creative story about a robot.\n", max_length=200, repetition_penalty=2.0)
    assert done["output"]["generated_text"] == expected
    assert done["output"]["seed"] == 2024


def test_seeded_sampling_is_reproducible_through_the_stack(stack):
    params = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 77, "max_new_tokens": 20}
    first, second = (wait_for_job(stack.url, stack.submit("Hello", parameters=params)["id"]) for _ in range(2))
    assert first["output"]["generated_text"] == second["output"]["generated_text"]
    assert first["output"]["seed"] == 77


def test_stop_sequence_ends_the_job_and_is_not_returned(stack):
    # A stop string taken from a first run's text; the second run (same greedy prompt) must end on it and
    # return the text before it. Whatever the second run generated, its own tokens are the judge: if their
    # text holds the stop, it must have ended there; if it does not (a greedy near-tie made the two runs
    # part before the stop), it ran to its length, and a stop is taken from it for another try.
    params = {"max_new_tokens": 30, "details": True}
    first = wait_for_job(stack.url, stack.submit("Once upon a time", parameters=params)["id"])
    text = first["output"]["generated_text"]
    ended_on_stop = False
    for _ in range(3):
        stop = text[8:11]
        out = wait_for_job(stack.url, stack.submit("Once upon a time", parameters={**params, "stop": [stop]})["id"])[
            "output"]
        whole = _decode(stack, [token["id"] for token in out["details"]["tokens"]])
        context = (text, stop, out["generated_text"], whole)
        assert stop not in out["generated_text"], context
        if out["finish_reason"] == "stop_sequence":
            assert out["generated_text"] == whole[: whole.index(stop)], context
            ended_on_stop = True
            break
        assert out["finish_reason"] == "length" and stop not in whole, context
        text = whole
    assert ended_on_stop


def _decode(stack, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stack.model).decode(ids, skip_special_tokens=True)


def test_return_full_text_keeps_the_multilingual_prompt_intact(stack):
    prompt = "مرحبا 你好 Grüße"
    done = wait_for_job(
        stack.url, stack.submit(prompt, parameters={"max_new_tokens": 5, "return_full_text": True})["id"]
    )
    assert done["output"]["generated_text"].startswith(prompt)


def test_web_form_redirects_to_a_page_that_shows_the_text(stack):
    session = requests.Session()
    token = csrf_token(session.get(f"{stack.url}/", timeout=5).text)
    response = session.post(
        f"{stack.url}/", data={"inputs": "Once upon a time", "max_new_tokens": "12", "csrf_token": token},
        allow_redirects=False,
    )
    assert response.status_code == 303
    page_url = response.headers["Location"]
    job_id = re.search(r"/jobs/([0-9a-f-]{36})$", page_url).group(1)
    page = session.get(f"{stack.url}{page_url}")
    assert page.status_code == 200 and job_id in page.text
    done = wait_for_job(stack.url, job_id)
    assert done["status"] == "succeeded"
    final_page = session.get(f"{stack.url}/jobs/{job_id}").text
    assert html.escape(done["output"]["generated_text"]) in final_page
    assert "succeeded" in final_page


def test_error_responses_over_http(stack):
    base = f"{stack.url}/api/v1"
    missing = requests.get(f"{base}/jobs/00000000-0000-4000-8000-000000000000", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    bad_json = requests.post(f"{base}/jobs", data="{", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "bad_request"
    invalid = requests.post(f"{base}/jobs", json={"inputs": "x", "parameters": {"top_p": 3}}, timeout=5)
    assert invalid.status_code == 422
    assert invalid.json()["error"]["fields"][0]["name"] == "parameters.top_p"


def test_models_shows_the_live_worker(stack):
    models = requests.get(f"{stack.url}/api/v1/models", timeout=5).json()["models"]
    tiny = next(m for m in models if m["name"] == "tiny-bloom")
    assert tiny["workers"] == 1 and tiny["default"] is True
    workers = requests.get(f"{stack.url}/api/v1/workers", timeout=5).json()["workers"]
    assert workers[0]["model"] == "tiny-bloom" and workers[0]["dtype"] == "float32"


def test_a_prompt_too_long_for_max_length_is_refused_by_the_web_or_failed_by_the_worker(stack):
    # The web counts tokens with the model's tokenizer.json when it has the file (it does here)...
    refused = requests.post(f"{stack.url}/api/v1/jobs", timeout=5,
                            json={"inputs": "Once upon a time there was", "parameters": {"max_length": 2}})
    assert refused.status_code == 422 and refused.json()["error"]["fields"][0]["name"] == "parameters.max_length"
    # ...and where it cannot (a hub model not on the web machine), the worker fails the job at once.
    from config.settings import Settings
    from jobs.celery_app import make_celery, send_generate
    from jobs.connection import connect
    from jobs.schema import GenerateParameters, Job, new_job_id
    from jobs.store import JobStore

    settings = Settings(redis_url=stack.redis.url)
    job = Job(id=new_job_id(), model="tiny-bloom", inputs="Once upon a time there was",
              parameters=GenerateParameters(max_length=2).normalised(64))
    JobStore(connect(settings.redis_url), 3600).create(job)
    send_generate(make_celery(settings), job.id, "bloomq.tiny-bloom")
    done = wait_for_job(stack.url, job.id)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "validation_error" and "max_length" in done["error"]["message"]
    ok = wait_for_job(stack.url, stack.submit("still serving", parameters={"max_new_tokens": 3})["id"])
    assert ok["status"] == "succeeded"


def test_concurrent_jobs_are_batched_and_each_matches_direct_generate(stack, reference):
    lengths = [150, 40, 90, 10, 120, 60]
    jobs = [stack.submit(p, parameters={"max_new_tokens": n}) for p, n in zip(PROMPTS + ["x"], lengths)]
    done = [wait_for_job(stack.url, j["id"]) for j in jobs]
    for job, prompt, n in zip(done, PROMPTS + ["x"], lengths, strict=True):
        assert job["status"] == "succeeded"
        assert job["output"]["generated_text"] == reference(prompt, max_new_tokens=n)
    spans = sorted((j["started_at"], j["finished_at"]) for j in done)
    overlapping = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlapping > 0  # some jobs ran at the same time in one worker process
    workers = requests.get(f"{stack.url}/api/v1/workers", timeout=5).json()["workers"]
    assert len(workers) == 1 and workers[0]["batch_capacity"] > 1

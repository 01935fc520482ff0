"""The OpenAI Batch API through the ``openai`` client against the live stack, and priority classes."""

from __future__ import annotations

import contextlib
import json

import openai
import pytest
import redis
import requests

from tests.e2e.conftest import make_reference, running_stack
from tests.support import wait_for, wait_for_job

PROMPTS = ["Once upon a time", "从前有一座山", "def fibonacci(n):", "Il était une fois", "كان يا ما كان", "x"]


@pytest.fixture()
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def _line(custom_id: str, prompt: str, max_tokens: int, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-bloom", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body}}


def _until(oai, batch_id: str, statuses: tuple[str, ...], timeout: float = 120):
    return wait_for(lambda: (b := oai.batches.retrieve(batch_id)).status in statuses and b, timeout=timeout,
                    interval=0.2, what=f"batch {batch_id} to reach {statuses}")


def test_a_batch_runs_every_line_as_a_job_and_returns_one_output_line_each(stack, oai, reference):
    lines = [_line(f"req-{i}", prompt, 16) for i, prompt in enumerate(PROMPTS)]
    upload = oai.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    assert upload.bytes == len(_jsonl(lines))
    assert upload.id in [f.id for f in oai.files.list()]  # the client's own listing call
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                               metadata={"project": "labels"})
    assert batch.status == "in_progress" and batch.request_counts.total == len(PROMPTS)
    done = _until(oai, batch.id, ("completed",))
    assert done.request_counts.completed == len(PROMPTS) and done.request_counts.failed == 0
    assert done.metadata == {"project": "labels"} and done.error_file_id is None
    output = [json.loads(row) for row in oai.files.content(done.output_file_id).text.splitlines()]
    assert sorted(row["custom_id"] for row in output) == sorted(line["custom_id"] for line in lines)
    for row in output:
        prompt = PROMPTS[int(row["custom_id"].split("-")[1])]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert row["response"]["body"]["choices"][0]["text"] == reference(prompt, max_new_tokens=16)
        job = requests.get(f"{stack.url}/api/v1/jobs/{row['response']['request_id']}", timeout=10).json()
        assert job["status"] == "succeeded" and job["priority_class"] == "batch" and job["batch_id"] == batch.id


def test_a_malformed_file_is_refused_with_line_numbers_and_leaves_nothing(stack, oai):
    client = redis.Redis.from_url(stack.redis.url)
    jobs_before, batches_before = len(client.keys("bloomq:job:*")), len(client.keys("bloomq:batch:*"))
    content = _jsonl([_line("a", "hi", 4), _line("a", "again", 4)]) + b"not json\n" + _jsonl(
        [_line("b", "hi", 4, temperature=9), {"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}},
         _line("d", "hi", 4, top_k=0)])
    upload = oai.files.create(file=("bad.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        oai.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    listed = refused.value.body["errors"]["data"]
    assert {(e["line"], e["code"]) for e in listed} == {
        (2, "duplicate_custom_id"), (3, "invalid_json_line"), (4, "invalid_request"), (5, "invalid_url"),
        (6, "invalid_request")}
    assert {e["line"]: e["param"] for e in listed if e["code"] == "invalid_request"} == {4: "body.temperature",
                                                                                        6: "body.top_k"}
    # No batch, no job, no queued line: the valid lines 1 and 2 did not run either.
    assert len(client.keys("bloomq:batch:*")) == batches_before and len(client.keys("bloomq:job:*")) == jobs_before
    assert client.llen("bloomq:batch-queue:tiny-bloom:-") == 0


def test_a_cancelled_batch_stops_its_lines_and_keeps_what_finished(stack, oai):
    lines = [_line(f"long-{i}", PROMPTS[i % len(PROMPTS)], 1900) for i in range(40)]
    upload = oai.files.create(file=("long.jsonl", _jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _until(oai, batch.id, ("cancelled",))
    assert done.request_counts.completed + done.request_counts.failed == 40
    assert done.request_counts.failed > 0
    errors = [json.loads(row) for row in oai.files.content(done.error_file_id).text.splitlines()]
    assert len(errors) == done.request_counts.failed
    assert {row["error"]["code"] for row in errors} == {"batch_cancelled"}


def test_batches_are_listed_newest_first_with_cursor_paging(oai):
    ids = []
    for i in range(3):
        upload = oai.files.create(file=(f"p{i}.jsonl", _jsonl([_line("only", "hi", 2)])), purpose="batch")
        ids.append(oai.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                      completion_window="24h").id)
    first = oai.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = oai.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    everything = [b.id for b in oai.batches.list(limit=2)]  # iterating follows the cursor page by page
    assert everything[:3] == ids[::-1] and len(everything) == len(set(everything))


def test_a_lost_interactive_message_behind_a_big_batch_is_sent_again(stack, oai):
    from jobs.schema import GenerateParameters, Job, new_job_id
    from jobs.store import JobStore

    lines = [_line(f"l{i}", PROMPTS[i % 6], 400) for i in range(2000)]
    upload = oai.files.create(file=("big.jsonl", _jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    try:
        client = redis.Redis.from_url(stack.redis.url)
        # A job whose message was taken by a worker that died before starting it: stored, never delivered.
        lost = Job(id=new_job_id(), model="tiny-bloom", inputs="Once upon a time",
                   parameters=GenerateParameters(max_new_tokens=4, do_sample=False))
        JobStore(client, 3600).create(lost)
        done = wait_for_job(stack.url, lost.id, timeout=60)
        assert done["status"] == "succeeded" and done["attempts"] == 1
        waiting = client.llen("bloomq:batch-queue:tiny-bloom:-")
        assert waiting > 1000  # the batch's lines were still waiting, older than the lost job
    finally:
        oai.batches.cancel(batch.id)
    assert _until(oai, batch.id, ("cancelled",)).request_counts.total == 2000


def test_a_message_delivered_twice_to_one_worker_runs_once(stack):
    from config.settings import Settings
    from jobs.celery_app import make_celery, send_generate
    from jobs.schema import GenerateParameters, Job, new_job_id
    from jobs.store import JobStore

    client = redis.Redis.from_url(stack.redis.url)
    job = Job(id=new_job_id(), model="tiny-bloom", inputs="Il était une fois",
              parameters=GenerateParameters(max_new_tokens=300, do_sample=False))
    JobStore(client, 3600).create(job)
    app = make_celery(Settings(redis_url=stack.redis.url))
    send_generate(app, job.id, "bloomq.tiny-bloom")
    send_generate(app, job.id, "bloomq.tiny-bloom")  # the same message again, as a duplicate delivery
    done = wait_for_job(stack.url, job.id, timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    wait_for(lambda: stack.workers[0].log().count(f"job {job.id}: ") >= 3, timeout=10, what="both deliveries")
    log = stack.workers[0].log()
    assert log.count(f"job {job.id}: started") == 1 and log.count(f"job {job.id}: succeeded") == 1


def test_an_interactive_job_finishes_before_a_batch_that_filled_the_worker(request, tmp_path_factory, slow_model_dir):
    reference = make_reference(slow_model_dir)
    with running_stack(request, tmp_path_factory, slow_model_dir, BLOOMQ_MAX_BATCH_SIZE="2") as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "slow-bloom", "prompt": PROMPTS[i % 6], "max_tokens": 60, "temperature": 0}}
                 for i in range(12)]
        upload = client.files.create(file=("fill.jsonl", _jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 1, timeout=120,
                 what="the batch to be under way")
        urgent = s.submit("Urgent question", parameters={"max_new_tokens": 20})
        done = wait_for_job(s.url, urgent["id"], timeout=120)
        finished = client.batches.retrieve(batch.id)
        assert done["status"] == "succeeded"
        assert done["output"]["generated_text"] == reference("Urgent question", max_new_tokens=20)
        assert finished.status == "in_progress"  # the batch was still running when the urgent job ended
        print(f"interactive job queued {done['metrics']['queue_seconds'] * 1000:.0f} ms behind a full batch")
        assert _until(client, batch.id, ("completed",), timeout=300).request_counts.completed == 12


def test_two_keys_batches_share_the_worker_fairly(request, tmp_path_factory, tiny_model_dir):
    keys = ("key-big", "key-small")
    with running_stack(request, tmp_path_factory, tiny_model_dir, BLOOMQ_API_KEYS=",".join(keys),
                       BLOOMQ_MAX_BATCH_SIZE="2") as s:
        clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key=k, max_retries=0, timeout=60) for k in keys]

        def start(client, n):
            lines = [_line(f"r{i}", PROMPTS[i % 6], 100) for i in range(n)]
            upload = client.files.create(file=("b.jsonl", _jsonl(lines)), purpose="batch")
            return client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                         completion_window="24h")

        big = start(clients[0], 40)  # first in, and four times the size
        small = start(clients[1], 10)
        with pytest.raises(openai.NotFoundError):
            clients[1].batches.retrieve(big.id)  # another key's batch
        _until(clients[1], small.id, ("completed",), timeout=180)
        progress = clients[0].batches.retrieve(big.id).request_counts
        # Taking turns, the small batch ended while the big one had done about as many lines, not all 40.
        assert progress.completed < 40
        print(f"when the small batch (10 lines) ended, the big one had {progress.completed} of 40 done")
        assert _until(clients[0], big.id, ("completed",), timeout=300).request_counts.completed == 40


def test_a_worker_killed_and_redis_restarted_mid_batch_lose_no_line(request, tmp_path_factory, slow_model_dir):
    from tests.e2e.conftest import make_stack

    stack = make_stack(request, tmp_path_factory, slow_model_dir, appendonly=True, BLOOMQ_MAX_BATCH_SIZE="4")
    try:
        stack.start_web()
        first = stack.start_worker()
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=2, timeout=60)
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "slow-bloom", "prompt": PROMPTS[i % 6], "max_tokens": 40 + 10 * (i % 5),
                           "temperature": 0}} for i in range(24)]
        upload = client.files.create(file=("crash.jsonl", _jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, timeout=120,
                 what="the batch to be under way")
        first.kill()  # SIGKILL with lines running in its engine and taken from the queue
        stack.start_worker()
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, timeout=120,
                 what="the batch to go on")
        stack.redis.restart(down_seconds=1)
        done = _until(client, batch.id, ("completed",), timeout=300)
        assert done.request_counts.completed == 24 and done.request_counts.failed == 0
        output = [json.loads(row) for row in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(row["custom_id"] for row in output) == sorted(f"l{i}" for i in range(24))
        job_ids = [row["response"]["request_id"] for row in output]
        attempts = {job_id: requests.get(f"{stack.url}/api/v1/jobs/{job_id}", timeout=10).json()["attempts"]
                    for job_id in job_ids}

        def unexplained() -> list[tuple[str, int]]:
            """Exactly once: one stored result per line's job. The SIGKILL may land between a result's write
            and its log line: a job the killed worker started, and never ran again, may have its one result
            without the line. (A live worker logs a result just after storing it, so this is polled.)"""
            logs, killed = "".join(w.log() for w in stack.workers), first.log()
            counts = {job_id: logs.count(f"job {job_id}: succeeded") for job_id in attempts}
            return [(job_id, stored) for job_id, stored in counts.items()
                    if not (stored == 1 or (stored == 0 and attempts[job_id] == 1
                                            and f"job {job_id}: started (attempt 1)" in killed))]

        with contextlib.suppress(AssertionError):  # the assertion below names what is still unexplained
            wait_for(lambda: not unexplained(), timeout=10, what="one logged result per line's job")
        assert unexplained() == []
    finally:
        stack.stop()

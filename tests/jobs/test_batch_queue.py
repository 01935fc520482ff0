"""The batch queue: lines taken in turn between API keys, recorded as taken until done (real Redis)."""

from jobs.queues import BatchQueue
from jobs.schema import GenerateParameters, Job, new_job_id
from jobs.store import JobStore


def test_keys_take_turns_and_every_line_comes_out_once(redis_client):
    queue = BatchQueue(redis_client)
    for i in range(5):
        queue.push("m", "big", f"big-{i}")
    for i in range(2):
        queue.push("m", "small", f"small-{i}")
    taken = [queue.take("m", "w:1") for _ in range(8)]
    assert taken[-1] is None
    owners = [job_id.split("-")[0] for job_id in taken[:4]]
    assert owners.count("big") == 2 and owners.count("small") == 2  # the small batch is not kept waiting
    assert sorted(taken[:7]) == sorted([f"big-{i}" for i in range(5)] + ["small-0", "small-1"])
    assert queue.depth("m") == 0


def test_lines_taken_by_a_dead_worker_go_back_once_and_only_if_still_queued(redis_client):
    store = JobStore(redis_client, 100)
    queue = BatchQueue(redis_client)
    jobs = [Job(id=new_job_id(), model="m", inputs="hi", parameters=GenerateParameters(), priority_class="batch")
            for _ in range(3)]
    for job in jobs:
        store.create(job)
        queue.push("m", None, job.id)
    assert queue.take("m", "dead:1") == jobs[0].id and queue.take("m", "dead:1") == jobs[1].id
    assert queue.take("m", "live:2") == jobs[2].id
    queue.done("live:2", jobs[2].id)
    store.cancel(jobs[1].id)  # ended while taken: it does not go back
    assert queue.dead_takers({"live:2"}) == ["dead:1"]
    assert queue.return_taken("dead:1") == [jobs[0].id]
    assert queue.return_taken("dead:1") == []  # a second reaper finds nothing left to return
    assert queue.dead_takers({"live:2"}) == []
    assert queue.take("m", "live:2") == jobs[0].id

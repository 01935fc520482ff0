"""The batch queue: lines taken in turn between API keys, recorded as taken until done (real Redis)."""

from jobs.batches import BatchQueue


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


def test_lines_taken_by_a_dead_worker_are_reported_until_forgotten(redis_client):
    queue = BatchQueue(redis_client)
    queue.push("m", None, "a")
    queue.push("m", None, "b")
    assert queue.take("m", "dead:1") == "a" and queue.take("m", "live:2") == "b"
    queue.done("live:2", "b")
    assert queue.taken_by_the_dead({"live:2"}) == {"dead:1": ["a"]}
    queue.forget_taken("dead:1")
    assert queue.taken_by_the_dead({"live:2"}) == {}

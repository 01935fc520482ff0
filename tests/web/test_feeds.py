"""Job feeds: one Redis reader per job per process, shared by every stream of that job."""

from __future__ import annotations

import threading

from jobs.progress import ProgressUpdate
from jobs.schema import GenerateParameters, Job, JobOutput, new_job_id
from jobs.store import JobStore
from tests.support import wait_for
from web.http.feeds import JobFeeds


def _job(store: JobStore) -> str:
    job = Job(id=new_job_id(), model="tiny-bloom", inputs="hi", parameters=GenerateParameters(max_new_tokens=3))
    store.create(job)
    store.start(job.id, "w")
    return job.id


def _finish(store: JobStore, job_id: str) -> None:
    store.succeed(job_id, JobOutput(generated_text="Hello", generated_tokens=2, finish_reason="length"), 0.1)


def _collect(feeds: JobFeeds, job_id: str, after: str = "0-0") -> list[tuple[str, str, str]]:
    feed = feeds.join(job_id)
    try:
        return [event for batch in feed.follow(after, wait_seconds=0.2) for event in batch]
    finally:
        feeds.leave(feed)


def test_followers_of_a_job_share_one_reader_and_each_gets_every_event_in_order(redis_client):
    store = JobStore(redis_client, 3600)
    feeds = JobFeeds(store, block_ms=200)
    job_id = _job(store)
    first, second = feeds.join(job_id), feeds.join(job_id)
    assert first is second and len(feeds) == 1
    feeds.leave(first)
    feeds.leave(second)
    results: list[list[tuple[str, str, str]]] = []
    followers = [threading.Thread(target=lambda: results.append(_collect(feeds, job_id))) for _ in range(3)]
    for follower in followers:
        follower.start()
    store.publish_progress([ProgressUpdate(job_id, "Hel", 1, attempt=1)])
    store.publish_progress([ProgressUpdate(job_id, "lo", 2, attempt=1)])
    _finish(store, job_id)
    for follower in followers:
        follower.join(timeout=10)
    expected = store.read_events(job_id, "0-0", block_ms=10)
    assert [event[1] for event in expected][-1] == "done"
    assert results == [expected] * 3


def test_a_follower_resumes_after_its_last_event_id(redis_client):
    store = JobStore(redis_client, 3600)
    job_id = _job(store)
    store.publish_progress([ProgressUpdate(job_id, "Hel", 1, attempt=1), ProgressUpdate(job_id, "lo", 2, attempt=1)])
    _finish(store, job_id)
    everything = store.read_events(job_id, "0-0", block_ms=10)
    resumed = _collect(JobFeeds(store, block_ms=200), job_id, after=everything[2][0])
    assert resumed == everything[3:]


def test_an_idle_follower_gets_empty_batches_for_keep_alives_and_an_unfollowed_feed_stops(redis_client):
    store = JobStore(redis_client, 3600)
    feeds = JobFeeds(store, block_ms=100)
    job_id = _job(store)
    feed = feeds.join(job_id)
    batches = feed.follow("0-0", wait_seconds=0.1)
    assert next(batches)  # what is there so far (the status events)
    assert next(batches) == []  # nothing new within the wait: time for a keep-alive
    feeds.leave(feed)
    wait_for(lambda: len(feeds) == 0, timeout=5, what="the feed to stop")
    assert feeds.join(job_id) is not feed  # a later follower starts a fresh reader

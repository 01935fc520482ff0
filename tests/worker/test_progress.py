"""The progress publisher: token events, partial outputs, restarts and the store's stop signals (real Redis).
The publishers here have no thread of their own: each test ticks them, so nothing races its ticks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from jobs.schema import GenerateParameters, Job, new_job_id
from jobs.store import JobStore
from worker.engine.outputs import Token
from worker.engine.params import SamplingParams
from worker.progress import ProgressPublisher


@dataclass
class Seq:
    """What the publisher reads of a sequence."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    restarts: int = 0
    logprobs: list[float] = field(default_factory=list)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=9))
    error: Exception | None = None
    sampling: object = field(default_factory=lambda: type("S", (), {"seed": None})())


class Engine:
    def partial_text(self, seq: Seq) -> str:
        return seq.text

    def token_detail(self, token: int, logprob: float) -> Token:
        return Token(id=token, text=f"<{token}>", logprob=logprob)


def _running(store: JobStore) -> Job:
    job = Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=9))
    store.create(job)
    return store.start(job.id, "w", "w:1")


def _events(store: JobStore, job_id: str) -> list[tuple[str, dict]]:
    return [(event, json.loads(data)) for _, event, data in store.read_events(job_id, "0-0", block_ms=10)]


def test_new_text_is_streamed_once_as_it_grows_and_flushed_on_forget(redis_client):
    store = JobStore(redis_client, 100)
    job = _running(store)
    seq = Seq()
    publisher = ProgressPublisher(store, Engine(), on_cancel=lambda _: None, threaded=False)
    publisher.follow(job.id, seq, job.attempts)
    seq.text, seq.tokens = "Hel", [1, 2]
    publisher.tick()
    publisher.tick()  # nothing new: nothing sent
    seq.text, seq.tokens = "Hello", [1, 2, 3]
    publisher.tick()
    seq.text, seq.tokens = "Hello there", [1, 2, 3, 4, 5]
    publisher.forget(job.id)  # the final text, before the result is stored
    tokens = [data for event, data in _events(store, job.id) if event == "token"]
    assert [t["text"] for t in tokens] == ["Hel", "lo", " there"]
    assert [t["index"] for t in tokens] == [2, 3, 5] and {t["attempt"] for t in tokens} == {1}


def test_a_restart_is_announced_and_the_text_resumes_from_its_beginning(redis_client):
    store = JobStore(redis_client, 100)
    job = _running(store)
    seq = Seq()
    publisher = ProgressPublisher(store, Engine(), on_cancel=lambda _: None, threaded=False)
    publisher.follow(job.id, seq, job.attempts)
    seq.text, seq.tokens = "Hello", [1, 2, 3]
    publisher.tick()
    seq.restarts, seq.text, seq.tokens = 1, "He", [1]  # the engine started the sequence over
    publisher.tick()
    seq.text, seq.tokens = "Hello!", [1, 2, 3, 4]
    publisher.tick()
    events = [(event, data.get("text")) for event, data in _events(store, job.id) if event in ("token", "restart")]
    assert events == [("token", "Hello"), ("restart", None), ("token", "He"), ("token", "llo!")]
    publisher.forget(job.id)


def test_partial_output_reaches_the_record_and_cancels_and_takeovers_are_reported(redis_client):
    store = JobStore(redis_client, 100)
    job = _running(store)
    other = _running(store)
    cancelled, superseded = [], []
    publisher = ProgressPublisher(store, Engine(), on_cancel=cancelled.append, on_superseded=superseded.append,
                                  threaded=False)
    seq, other_seq = Seq("par", [1]), Seq("x", [1])
    publisher.follow(job.id, seq, job.attempts)
    publisher.follow(other.id, other_seq, other.attempts)
    for followed in publisher._followed.values():
        followed.last_progress = 0.0  # due for a partial-output write
    publisher.tick()
    assert store.get(job.id).output.generated_text == "par"
    store.cancel(job.id)
    store.requeue_if_orphaned(other.id, set())  # taken from this attempt
    seq.text = "part"
    other_seq.text = "xy"
    publisher.tick()
    assert cancelled == [job.id] and superseded == [other.id]
    publisher.forget(job.id)
    publisher.forget(other.id)


def test_a_job_that_asked_for_details_streams_every_token_once_with_its_logprob(redis_client):
    store = JobStore(redis_client, 100)
    job = _running(store)
    seq = Seq(params=SamplingParams(max_new_tokens=9, details=True))
    publisher = ProgressPublisher(store, Engine(), on_cancel=lambda _: None, threaded=False)
    publisher.follow(job.id, seq, job.attempts)
    seq.text, seq.tokens, seq.logprobs = "ab", [5, 6], [-0.5, -0.25]
    publisher.tick()  # the newest token waits: a stop may still take it back
    seq.text, seq.tokens, seq.logprobs = "abc", [5, 6, 7], [-0.5, -0.25, -1.0]
    publisher.forget(job.id)
    streamed = [t for event, data in _events(store, job.id) if event == "token" for t in data.get("tokens", [])]
    assert [(t["id"], t["logprob"]) for t in streamed] == [(5, -0.5), (6, -0.25), (7, -1.0)]

"""Many watchers on the real stack (gunicorn's gevent worker, Redis, a worker): hundreds of event streams
and long polls at once while jobs keep being served, and the caps that protect the web."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.e2e.conftest import make_stack
from tests.support import wait_for, wait_for_job
from tests.watchers import TERMINAL, Crowd

JOBS, STREAMS_PER_JOB, POLLS_PER_JOB = 10, 20, 5


def test_hundreds_of_streams_and_long_polls_all_complete_while_jobs_are_served(slow_stack):
    jobs = [slow_stack.submit(f"Story {i}: once upon a time", parameters={"max_new_tokens": 300})["id"]
            for i in range(JOBS)]
    wait_for(lambda: _status(slow_stack, jobs[0]) != "queued", timeout=60, what="the jobs to start")
    with Crowd(slow_stack.url, streams=jobs * STREAMS_PER_JOB, polls=jobs * POLLS_PER_JOB, timeout=240) as crowd:
        wait_for(lambda: crowd.answered == len(crowd.streams), timeout=60, what="every stream to be answered")
        # The web still takes and serves new jobs while it holds every stream and long poll.
        extra = [slow_stack.submit("Hello", parameters={"max_new_tokens": 5})["id"] for _ in range(5)]
        assert requests.get(f"{slow_stack.url}/healthz", timeout=10).status_code == 200
        for job_id in extra:
            assert wait_for_job(slow_stack.url, job_id, timeout=180)["status"] == "succeeded"
        outcomes = crowd.results(timeout=240)
    problems = Counter(o.error for o in outcomes if o.error)
    assert not problems, problems.most_common(5)
    assert Counter(o.kind for o in outcomes) == {"stream": JOBS * STREAMS_PER_JOB, "poll": JOBS * POLLS_PER_JOB}
    assert all(_status(slow_stack, job_id) in TERMINAL for job_id in jobs)


def _status(stack, job_id: str) -> str:
    return requests.get(f"{stack.url}/api/v1/jobs/{job_id}", timeout=10).json()["status"]


# -- the caps ---------------------------------------------------------------------------------------

KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def capped(request, tmp_path_factory, tiny_model_dir):
    """One web process with small caps, two API keys and no worker (jobs stay queued, streams stay open),
    and a gunicorn timeout far shorter than a stream."""
    s = make_stack(request, tmp_path_factory, tiny_model_dir, BLOOMQ_API_KEYS=",".join(KEYS),
                   BLOOMQ_WEB_WORKERS="1", BLOOMQ_MAX_WATCHERS="5", BLOOMQ_MAX_WATCHERS_PER_KEY="3",
                   GUNICORN_CMD_ARGS="--timeout 2")
    try:
        s.start_web()
        yield s
    finally:
        s.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Held:
    """An open event stream: its response and its one line iterator (a second iterator over the same
    response would lose what the first had buffered, and dropping the first closes the connection)."""

    response: requests.Response
    lines: Iterator[bytes]

    @property
    def status_code(self) -> int:
        return self.response.status_code

    def close(self) -> None:
        self.response.close()


def _open(stack, key: str, job_id: str) -> Held:
    """An event stream, read up to its first line (so the server holds it)."""
    response = requests.get(f"{stack.url}/api/v1/jobs/{job_id}/events", headers=_auth(key), stream=True,
                            timeout=20)
    held = Held(response, response.iter_lines())
    if response.status_code == 200:
        assert next(held.lines).startswith(b"retry:")
    return held


def _job(stack, key: str) -> str:
    response = requests.post(f"{stack.url}/api/v1/jobs", json={"inputs": "Hello"}, headers=_auth(key), timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_watcher_caps_answer_429_per_key_and_503_per_process(capped):
    job_a, job_b = _job(capped, "key-a"), _job(capped, "key-b")
    opened_at = time.monotonic()
    held_a = [_open(capped, "key-a", job_a) for _ in range(3)]
    assert [r.status_code for r in held_a] == [200, 200, 200]

    over_key = _open(capped, "key-a", job_a)
    assert over_key.status_code == 429 and int(over_key.response.headers["Retry-After"]) > 0
    error = over_key.response.json()["error"]
    assert error["type"] == "too_many_watchers" and "BLOOMQ_MAX_WATCHERS_PER_KEY" in error["message"]
    poll = requests.get(f"{capped.url}/api/v1/jobs/{job_a}?wait=1", headers=_auth("key-a"), timeout=10)
    assert poll.status_code == 429  # a long poll takes a slot like a stream

    held_b = [_open(capped, "key-b", job_b) for _ in range(2)]
    assert [r.status_code for r in held_b] == [200, 200]
    full = _open(capped, "key-b", job_b)  # key b is under its cap, but the process holds its 5
    assert full.status_code == 503 and int(full.response.headers["Retry-After"]) > 0
    error = full.response.json()["error"]
    assert error["type"] == "too_many_watchers" and "BLOOMQ_MAX_WATCHERS" in error["message"]
    assert requests.get(f"{capped.url}/api/v1/jobs/{job_b}", headers=_auth("key-b"), timeout=10).status_code == 200

    # A client that goes away gives its slot back: the next keep-alive write finds the socket closed.
    held_a.pop().close()
    reopened = wait_for(lambda: _reopened(capped, "key-a", job_a), timeout=30, what="the closed stream's slot")
    assert reopened.status_code == 200

    # Streams outlive gunicorn's worker timeout (2 s here): the gevent worker reports from its own loop.
    while time.monotonic() - opened_at < 6:
        time.sleep(0.5)
    # The replayed status event, then a keep-alive sent 5 s after the stream opened: it is still served.
    assert any(next(held_a[0].lines) == b": keep-alive" for _ in range(8))
    for response in (*held_a, *held_b, reopened):
        response.close()


def _reopened(stack, key: str, job_id: str) -> Held | None:
    response = _open(stack, key, job_id)
    if response.status_code == 200:
        return response
    response.close()
    time.sleep(0.5)
    return None

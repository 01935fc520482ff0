"""Jobs made for a client that holds its connection open (the OpenAI- and TGI-compatible APIs): wait for
them, or relay their events as they come, and cancel them when the client goes away.

Under gunicorn's gevent worker every wait here parks a greenlet, not a thread. Each relay holds a
watcher slot (the same caps as event streams and long polls) for as long as it waits.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import request

from jobs.schema import Job
from web.http.errors import ApiError, ClientGone
from web.http.feeds import KEEPALIVE_SECONDS, JobFeeds
from web.http.watchers import Watch, watch
from web.services.jobs import JobService

log = logging.getLogger(__name__)


def wait_for_jobs(svc: JobService, job_ids: list[str], timeout: float) -> list[Job]:
    """The jobs once every one is final, or as they are when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    jobs = []
    for job_id in job_ids:
        job = svc.store.wait(job_id, max(0.0, deadline - time.monotonic()))
        if job is None:  # expired after retention while we waited: nothing sensible to return
            raise LookupError(f"job {job_id} disappeared while waiting for it")
        jobs.append(job)
    return jobs


def client_gone() -> bool:
    """Whether the client of this request has closed its connection (it can no longer get an answer).

    gunicorn hands the connection's socket to the app (``gunicorn.socket``); a socket that reads as
    end-of-file without blocking was closed by the client. Without it (another server), assume not.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def watched_submission(svc: JobService, submit: Callable[[], list[Job]]) -> tuple[Watch, list[Job]]:
    """The client's watcher slot, then its jobs (``submit()``): a client at its cap is refused before any
    job exists, and the slot is given back when the jobs are refused."""
    slot = watch(svc.settings.compat_wait_limit)
    try:
        return slot, submit()
    except BaseException:
        slot.release()
        raise


def wait_until_succeeded(svc: JobService, jobs: list[Job], error: Callable[[Job], Exception], slot: Watch
                         ) -> list[Job]:
    """The jobs once every one is final, holding the client's connection meanwhile (its watcher ``slot``,
    released at the end; no thread); ``error(job)`` is raised for the first one that did not succeed (or
    did not finish within ``BLOOMQ_COMPAT_WAIT_SECONDS``)."""
    seconds = svc.settings.compat_wait_limit
    deadline = time.monotonic() + seconds
    job_ids = [job.id for job in jobs]
    with slot:
        while True:
            # In slices, so a client that hung up is noticed within one and its jobs canceled.
            done = wait_for_jobs(svc, job_ids, min(KEEPALIVE_SECONDS, max(0.0, deadline - time.monotonic())))
            if all(job.status.terminal for job in done) or time.monotonic() >= deadline:
                break
            if client_gone():
                cancel_unfinished(svc, job_ids)
                raise ClientGone(f"the client went away; its jobs {', '.join(job_ids)} were canceled")
    for job in done:
        if job.status.value != "succeeded":
            raise error(job)
    return done


@dataclass
class JobEvent:
    """One event of one of the followed jobs."""

    index: int  # which of the followed jobs
    name: str  # status | token | restart | done
    data: dict[str, Any]


@dataclass
class _Relay:
    events: queue.Queue[JobEvent | BaseException | None] = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)


def follow_jobs(feeds: JobFeeds, job_ids: list[str], keepalive: float = KEEPALIVE_SECONDS,
                seconds: float | None = None) -> Iterator[JobEvent | None]:
    """The events of ``job_ids``, merged in arrival order, until every job's ``done`` event; ``None`` after
    ``keepalive`` seconds without one (time to write a keep-alive, which is also how a client that went
    away is noticed). Each job is read through its shared feed, by a greenlet (thread) of its own. With
    ``seconds``, it ends then even if some job has not ended (the caller sees which did not)."""
    ends = None if seconds is None else time.monotonic() + seconds
    relay = _Relay()
    readers = [
        threading.Thread(target=_read, args=(feeds, job_id, index, relay, keepalive), daemon=True,
                         name=f"relay-{job_id}")
        for index, job_id in enumerate(job_ids)
    ]
    for reader in readers:
        reader.start()
    finished = 0
    try:
        while finished < len(job_ids):
            wait = keepalive
            if ends is not None:
                wait = min(wait, ends - time.monotonic())
                if wait <= 0:
                    return
            try:
                item = relay.events.get(timeout=wait)
            except queue.Empty:
                if ends is None or time.monotonic() < ends:
                    yield None
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                finished += 1
                continue
            yield item
    finally:
        relay.stop.set()


def _read(feeds: JobFeeds, job_id: str, index: int, relay: _Relay, keepalive: float) -> None:
    feed = feeds.join(job_id)
    try:
        for batch in feed.follow("0-0", keepalive):
            if relay.stop.is_set():
                return
            for _, name, data in batch:
                relay.events.put(JobEvent(index, name, json.loads(data)))
        relay.events.put(None)
    except Exception as exc:  # the reader failed (Redis down): the relay ends with the error
        relay.events.put(exc)
    finally:
        feeds.leave(feed)


class TextRelay:
    """Turns one job's events into the new text to send, across restarts.

    A job whose text starts over (a new attempt on another worker, or an out-of-memory retry) regenerates
    the same text: greedy decoding is deterministic and a sampled job replays its seed. Text the client
    already has is not sent again; should the new text ever differ from it, ``diverged`` says so.
    """

    def __init__(self) -> None:
        self.sent = ""  # what the client has
        self.current = ""  # the text of the attempt now running
        self.attempt = 0
        self.diverged = False

    def feed(self, event: JobEvent) -> str:
        """The text to send for ``event`` (empty when there is none)."""
        if event.name == "status" and event.data.get("attempt", 0) > self.attempt:
            self.attempt, self.current = event.data["attempt"], ""
        elif event.name == "restart" and event.data.get("attempt") == self.attempt:
            self.current = ""
        elif event.name == "token" and event.data.get("attempt", self.attempt) == self.attempt:
            self.current += event.data["text"]
            return self._new()
        return ""

    def finish(self, final_text: str) -> str:
        """The rest of the final text that was never streamed."""
        self.current = final_text
        return self._new()

    def _new(self) -> str:
        if len(self.current) <= len(self.sent):
            if not self.sent.startswith(self.current):
                self.diverged = True
            return ""
        if not self.current.startswith(self.sent):
            self.diverged = True
            return ""
        delta, self.sent = self.current[len(self.sent) :], self.current
        return delta


def unfinished_error(job: Job) -> ApiError | None:
    """The error for a job still going when its client's wait ended (None when it is final)."""
    if job.status.terminal:
        return None
    return late_error(job.id)


def late_error(job_id: str) -> ApiError:
    """The error for job ``job_id`` not finished when its client's wait (or stream) ended."""
    return ApiError(504, "timeout", f"job {job_id} did not finish in time (BLOOMQ_COMPAT_WAIT_SECONDS); it goes on "
                    f"at /api/v1/jobs/{job_id}")


def failure_message(job: Job) -> str:
    """What a final job that did not succeed says to a compatible client."""
    return f"job {job.id} {job.status.value}: {job.error.message if job.error else 'canceled'}"


def cancel_unfinished(svc: JobService, job_ids: list[str]) -> None:
    """Cancel the jobs still queued or running (the client that wanted them went away)."""
    for job_id in job_ids:
        try:
            job = svc.store.get(job_id)
            if job is not None and not job.status.terminal:
                svc.store.cancel(job_id)
                log.info("job %s: canceled: its client disconnected", job_id)
        except redis.RedisError:
            log.warning("job %s: could not cancel it after its client left", job_id)

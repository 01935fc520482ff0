"""Many watchers at once on a live stack: event streams and long polls opened together over asyncio
(aiohttp) from a child process, every stream checked to be complete. Used by tests/e2e/test_watchers.py
and bench/watchers.py.

The crowd runs in its own process (its own event loop and interpreter lock), so whoever starts it can
submit jobs or time other requests meanwhile without the crowd's parsing skewing the figures.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Outcome:
    """How one watcher ended: ``error`` is empty when it was complete."""

    kind: str  # "stream" or "poll"
    job_id: str
    error: str = ""
    events: int = 0


def raise_fd_limit(wanted: int) -> None:
    """Let this process open ``wanted`` descriptors, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else wanted, hard))


def stream_problem(events: list[tuple[str, str, str]]) -> str:
    """What is wrong with a job's whole event stream as (id, event, data); empty when it is complete:
    ids in order, token indexes never going back, and a final ``done`` whose text is the tokens' text."""
    ids = [tuple(int(part) for part in event_id.split("-")) for event_id, _, _ in events]
    if ids != sorted(set(ids)):
        return "event ids out of order or repeated"
    if not events or events[-1][1] != "done":
        return f"no done event after {len(events)} events"
    text, index, attempt = "", 0, 0
    for _, event, data in events:
        body = json.loads(data)
        if event == "status" and body.get("attempt", attempt) > attempt:
            text, index, attempt = "", 0, body["attempt"]  # a restarted job streams its text again
        elif event == "token" and body.get("attempt", attempt) == attempt:
            if body["index"] < index:
                return f"token index went back from {index} to {body['index']}"
            text, index = text + body["text"], body["index"]
    done = json.loads(events[-1][2])
    if done["status"] != "succeeded":
        return f"the job ended {done['status']}: {done['error']}"
    output = done["output"]
    if text != output["generated_text"]:
        return f"streamed text ({len(text)} chars) is not the job's text ({len(output['generated_text'])} chars)"
    if index != output["generated_tokens"]:
        return f"last token index {index}, but the job generated {output['generated_tokens']} tokens"
    return ""


async def _events(content: Any) -> AsyncIterator[tuple[str, str, str]]:
    """Server-Sent Events as (id, event, data); comments (keep-alives) are skipped."""
    event_id, event, data = "", "message", []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event_id, event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)


async def _stream(session: Any, base: str, job_id: str, answered: Any) -> Outcome:
    import aiohttp

    events: list[tuple[str, str, str]] = []
    try:
        async with session.get(f"{base}/api/v1/jobs/{job_id}/events") as response:
            with answered.get_lock():
                answered.value += 1
            if response.status != 200:
                return Outcome("stream", job_id, f"HTTP {response.status}: {(await response.text())[:200]}")
            async for event in _events(response.content):
                events.append(event)
                if event[1] == "done":
                    break
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome("stream", job_id, f"{type(exc).__name__} after {len(events)} events: {exc}", len(events))
    return Outcome("stream", job_id, stream_problem(events), len(events))


async def _poll(session: Any, base: str, job_id: str, wait: float, patience: float) -> Outcome:
    import aiohttp

    url, timeout = f"{base}/api/v1/jobs/{job_id}", aiohttp.ClientTimeout(total=wait + patience)
    try:
        async with session.get(url, params={"wait": str(wait)}, timeout=timeout) as response:
            if response.status != 200:
                return Outcome("poll", job_id, f"HTTP {response.status}: {(await response.text())[:200]}")
            job = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome("poll", job_id, f"{type(exc).__name__}: {exc}")
    return Outcome("poll", job_id, "" if job["id"] == job_id else "another job came back")


async def _crowd(base: str, streams: list[str], polls: list[str], poll_wait: float, timeout: float,
                 patience: float, headers: dict[str, str], answered: Any) -> list[Outcome]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # one connection per watcher, no pool cap
    # A stream silent for ``patience`` seconds is dead (a served one gets a keep-alive every 5 s).
    stream_timeout = aiohttp.ClientTimeout(total=timeout, sock_read=patience)
    async with aiohttp.ClientSession(connector=connector, headers=headers, read_bufsize=2**20,
                                     timeout=stream_timeout) as session:
        watchers = [_stream(session, base, job_id, answered) for job_id in streams]
        watchers += [_poll(session, base, job_id, poll_wait, patience) for job_id in polls]
        return list(await asyncio.gather(*watchers))


def _run(base: str, streams: list[str], polls: list[str], poll_wait: float, timeout: float, patience: float,
         headers: dict[str, str], answered: Any, conn: Any) -> None:
    raise_fd_limit(len(streams) + len(polls) + 256)
    conn.send(asyncio.run(_crowd(base, streams, polls, poll_wait, timeout, patience, headers, answered)))
    conn.close()


class Crowd:
    """Event streams (one per entry of ``streams``, a job id) and long polls (``polls``) opened all at once
    from a child process; ``results`` waits for them all. A stream gives up after ``timeout`` s, or after
    ``patience`` s without a byte; a long poll after its wait plus ``patience``."""

    def __init__(self, base: str, streams: list[str], polls: list[str], poll_wait: float = 60.0,
                 timeout: float = 300.0, patience: float = 30.0, headers: dict[str, str] | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.streams, self.polls = streams, polls
        self._answered = context.Value("i", 0)
        self._conn, child_conn = context.Pipe(duplex=False)
        self._proc = context.Process(
            target=_run,
            args=(base, streams, polls, poll_wait, timeout, patience, headers or {}, self._answered, child_conn),
            daemon=True,
        )

    def start(self) -> Crowd:
        self._proc.start()
        return self

    @property
    def answered(self) -> int:
        """Streams that have their response (200 or an error status) so far."""
        return self._answered.value

    def results(self, timeout: float) -> list[Outcome]:
        """Every watcher's outcome, streams first; an AssertionError if they are not all over in time."""
        if not self._conn.poll(timeout):
            self.stop()
            raise AssertionError(f"the watchers were not all over after {timeout} s")
        outcomes = self._conn.recv()
        self._proc.join(timeout=10)
        return outcomes

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)

    def __enter__(self) -> Crowd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""One Redis reader per job per web process, shared by every event stream of that job.

A thousand clients following twenty jobs would otherwise make a thousand blocking ``XREAD`` calls for
every batch of tokens -- the web's main cost once waiting itself is cheap. A feed reads its job's stream
once, from the start, keeps the events in memory while anyone follows the job, and wakes its followers;
each follower picks up from its own ``Last-Event-ID``. The buffer is bounded by the Redis stream's own cap
(``STREAM_MAXLEN``), and a feed with no followers stops within one keep-alive interval.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator

from jobs.store import JobStore

log = logging.getLogger(__name__)

Event = tuple[str, str, str]  # (stream id, event, data)
# An idle stream sends a comment this often: it keeps proxies from timing the stream out, and the write
# is how a client that went away is noticed (and its watcher slot released). A feed with no followers
# also stops within this long.
KEEPALIVE_SECONDS = 5


def _order(event_id: str) -> tuple[int, int]:
    millis, _, seq = event_id.partition("-")
    return int(millis), int(seq or 0)


def _event_order(event: Event) -> tuple[int, int]:
    return _order(event[0])


class JobFeed:
    """The events of one job as one reader sees them, shared by the job's followers."""

    def __init__(self, feeds: JobFeeds, job_id: str) -> None:
        self.feeds = feeds
        self.job_id = job_id
        self.events: list[Event] = []
        self.ended = False  # the done event was read: nothing more will come
        self.error: BaseException | None = None  # the reader failed; followers re-raise it
        self.followers = 0
        self.changed = threading.Condition()  # a gevent condition once the worker has monkey-patched

    def follow(self, after: str, wait_seconds: float) -> Iterator[list[Event]]:
        """Batches of events after id ``after``, in order; an empty batch after ``wait_seconds`` without
        news (time for a keep-alive). Ends after the done event."""
        start, position = _order(after), 0
        while True:
            with self.changed:
                # The feed may not have read as far as ``after`` yet: skip what comes up to it.
                position = max(position, bisect.bisect_right(self.events, start, key=_event_order))
                if position >= len(self.events) and not self.ended and self.error is None:
                    self.changed.wait(wait_seconds)
                    position = max(position, bisect.bisect_right(self.events, start, key=_event_order))
                batch = self.events[position:]
                ended, error = self.ended, self.error
            if batch:
                position += len(batch)
                yield batch
            elif ended:
                return
            elif error is not None:
                raise error
            else:
                yield []

    def read(self, block_ms: int) -> None:
        """The reader: append the job's events as they come, until the done event or no one follows."""
        cursor = "0-0"
        try:
            while not self.ended and self.feeds.keep(self):
                events = self.feeds.store.read_events(self.job_id, cursor, block_ms=block_ms)
                if not events:
                    continue
                cursor = events[-1][0]
                with self.changed:
                    self.events.extend(events)
                    self.ended = any(event == "done" for _, event, _ in events)
                    self.changed.notify_all()
        except Exception as exc:  # handed to the followers: their streams end with it, and clients resume
            log.warning("job %s: reading its events failed: %s", self.job_id, exc)
            with self.changed:
                self.error = exc
                self.changed.notify_all()
        finally:
            self.feeds.drop(self)


class JobFeeds:
    """This process's feeds, one per followed job."""

    def __init__(self, store: JobStore, block_ms: int = KEEPALIVE_SECONDS * 1000) -> None:
        self.store = store
        self.block_ms = block_ms
        self._feeds: dict[str, JobFeed] = {}
        self._lock = threading.Lock()

    def join(self, job_id: str) -> JobFeed:
        """The job's feed, started if none is running; call ``leave`` when done with it."""
        with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                feed = self._feeds[job_id] = JobFeed(self, job_id)
                threading.Thread(target=feed.read, args=(self.block_ms,), name=f"feed-{job_id}",
                                 daemon=True).start()
            feed.followers += 1
            return feed

    def leave(self, feed: JobFeed) -> None:
        with self._lock:
            feed.followers -= 1

    def keep(self, feed: JobFeed) -> bool:
        """Whether ``feed`` should read on: someone follows it. One that should not is dropped here, under
        the lock, so a follower joining now gets a new feed instead of a stopping one."""
        with self._lock:
            if feed.followers > 0:
                return True
            self._drop(feed)
            return False

    def drop(self, feed: JobFeed) -> None:
        """Forget ``feed`` (it ended or failed): the next follower of its job starts a fresh one."""
        with self._lock:
            self._drop(feed)

    def _drop(self, feed: JobFeed) -> None:
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]

    def __len__(self) -> int:
        return len(self._feeds)

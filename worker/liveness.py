"""How a worker process stays visible and reachable: its heartbeat, and the cancel requests it hears."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable

import redis

from jobs.keys import CANCEL_CHANNEL
from jobs.workers import WorkerDirectory, WorkerInfo

log = logging.getLogger(__name__)

HEARTBEATS_PER_LIFETIME = 3  # an announcement lives this many heartbeats: a worker is gone after missing them all


def process_instance(name: str, pid: int | None = None) -> str:
    """This process start's instance id: the worker's name, its pid and a random boot id. A restarted container
    keeps its host name and its supervisor starts the children in the same order, so name and pid repeat; a
    repeated id would make the jobs of the dead process look like this live one's (the store turns their
    redelivery away as "already running here", the reapers never take them back)."""
    return f"{name}:{os.getpid() if pid is None else pid}:{secrets.token_hex(4)}"


class Periodic:
    """A daemon thread running ``tick`` every ``interval`` seconds until stopped; errors are logged."""

    def __init__(self, name: str, interval: float, tick: Callable[[], None]) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.warning("%s failed; retrying", self._thread.name, exc_info=True)
            self._stop.wait(self.interval)


class Heartbeat(Periodic):
    """Refreshes this worker's announcement in Redis until stopped, then withdraws it."""

    def __init__(self, directory: WorkerDirectory, info: Callable[[], WorkerInfo], interval: float) -> None:
        self.directory = directory
        self.info = info
        self.instance = info().instance
        self.ttl = interval * HEARTBEATS_PER_LIFETIME
        super().__init__("bloomq-heartbeat", interval, lambda: directory.announce(info(), ttl_seconds=self.ttl))

    def stop(self) -> None:
        super().stop()
        try:
            self.directory.withdraw(self.instance)
        except redis.RedisError:  # Redis may be the reason we are stopping
            log.warning("could not withdraw worker record %s", self.instance)


class CancelListener:
    """Forwards cancel requests published on Redis to the jobs this process is running."""

    def __init__(self, client: redis.Redis, cancel: Callable[[str], bool]) -> None:
        self.client = client
        self.cancel = cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bloomq-cancels", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        job_id = message["data"].decode()
                        if self.cancel(job_id):
                            log.info("job %s: cancel requested; stopping it", job_id)
            except redis.RedisError:
                log.warning("cancel listener lost Redis; reconnecting")
                self._stop.wait(1.0)
            finally:
                pubsub.close()

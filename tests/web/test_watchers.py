"""Watcher slots: the caps on event streams and long polls, per key (in Redis) and per process."""

from __future__ import annotations

import os
import runpy
import threading
import time
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from config.values import SettingsError
from tests.support import free_port, wait_for
from web import create_app
from web.http.errors import ApiError
from web.http.watchers import WatcherSlots, watchers_key

GUNICORN_CONF = Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py"


def _refused(slots: WatcherSlots, who: str = "key:a") -> ApiError:
    with pytest.raises(ApiError) as caught:
        slots.acquire(who, 10)
    return caught.value


def test_a_key_holds_at_most_its_cap_and_a_released_slot_is_reusable(redis_client):
    slots = WatcherSlots(redis_client, per_key=2, per_process=100)
    first, second = slots.acquire("key:a", 10), slots.acquire("key:a", 10)
    err = _refused(slots)
    assert (err.status, err.type, err.retry_after) == (429, "too_many_watchers", 5)
    assert "BLOOMQ_MAX_WATCHERS_PER_KEY" in err.message and "2" in err.message
    slots.acquire("key:b", 10).release()  # another key has its own slots
    first.release()
    first.release()  # releasing twice gives back one slot, not two
    third = slots.acquire("key:a", 10)
    assert redis_client.zcard(watchers_key("key:a")) == 2 and slots.held == 2
    with second, third:
        pass
    assert redis_client.zcard(watchers_key("key:a")) == 0 and slots.held == 0


def test_the_per_key_cap_is_shared_by_every_web_process(redis_client):
    one = WatcherSlots(redis_client, per_key=1, per_process=100)
    other = WatcherSlots(redis_client, per_key=1, per_process=100)
    held = one.acquire("key:a", 10)
    assert _refused(other).status == 429
    held.release()
    other.acquire("key:a", 10).release()


def test_a_full_process_answers_503_before_asking_redis(redis_client):
    slots = WatcherSlots(redis_client, per_key=100, per_process=1)
    held = slots.acquire("key:a", 10)
    err = _refused(slots, "key:b")
    assert (err.status, err.type, err.retry_after) == (503, "too_many_watchers", 5)
    assert "BLOOMQ_MAX_WATCHERS" in err.message
    assert not redis_client.exists(watchers_key("key:b"))
    held.release()
    slots.acquire("key:b", 10).release()


def test_slots_leaked_by_a_dead_process_expire_at_their_deadline(redis_client):
    redis_client.zadd(watchers_key("key:a"), {"crashed-process-watch": time.time() - 1})
    slots = WatcherSlots(redis_client, per_key=1, per_process=100, grace_seconds=0)
    leaked = slots.acquire("key:a", 0.3)  # the expired slot is dropped; this one is never released
    assert redis_client.zrange(watchers_key("key:a"), 0, -1) == [leaked.member.encode()]
    assert 0 < redis_client.ttl(watchers_key("key:a")) <= 1  # the key itself cannot outlive its slots
    wait_for(lambda: _acquires(slots, "key:a"), timeout=5, what="the leaked slot to expire")


def _acquires(slots: WatcherSlots, who: str) -> bool:
    try:
        slots.acquire(who, 10).release()
    except ApiError:
        return False
    return True


def test_a_redis_error_gives_the_process_slot_back(redis_client):
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    slots = WatcherSlots(dead, per_key=1, per_process=1)
    with pytest.raises(redis.ConnectionError):
        slots.acquire("key:a", 10)
    assert slots.held == 0


# -- through the API --------------------------------------------------------------------------------


@pytest.fixture()
def capped(settings):
    app = create_app(settings.replace(max_watchers_per_key=1, max_watchers=2))
    app.config["TESTING"] = True
    return app


def _job(client) -> str:
    return client.post("/api/v1/jobs", json={"inputs": "Hello"}).get_json()["id"]


def test_a_second_long_poll_over_the_key_cap_is_a_429_json_with_retry_after(capped, redis_client):
    client = capped.test_client()
    job_id = _job(client)
    polling = threading.Thread(target=lambda: capped.test_client().get(f"/api/v1/jobs/{job_id}?wait=1.5"))
    polling.start()
    wait_for(lambda: redis_client.zcard(watchers_key("127.0.0.1")) == 1, timeout=5, what="the first long poll")
    refused = client.get(f"/api/v1/jobs/{job_id}?wait=1")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"]["type"] == "too_many_watchers"
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200  # a plain read is no watcher
    polling.join()
    assert redis_client.zcard(watchers_key("127.0.0.1")) == 0
    assert client.get(f"/api/v1/jobs/{job_id}?wait=0.1").status_code == 200


def test_an_event_stream_holds_its_slot_until_the_response_is_closed(capped, redis_client):
    client = capped.test_client()
    job_id = _job(client)
    stream = client.get(f"/api/v1/jobs/{job_id}/events", buffered=False)
    assert stream.status_code == 200
    assert next(stream.response).startswith(b"retry:")  # the stream is running
    refused = client.get(f"/api/v1/jobs/{job_id}/events")
    assert refused.status_code == 429 and refused.get_json()["error"]["type"] == "too_many_watchers"
    stream.close()  # what the WSGI server does when the client goes away (or the stream ends)
    assert redis_client.zcard(watchers_key("127.0.0.1")) == 0
    assert capped.extensions["bloomq.watchers"].held == 0
    # A stream that never started sending releases its slot on close too.
    client.get(f"/api/v1/jobs/{job_id}/events", buffered=False).close()
    assert redis_client.zcard(watchers_key("127.0.0.1")) == 0


def test_the_process_cap_is_a_503_json_with_retry_after(settings, redis_client):
    app = create_app(settings.replace(max_watchers_per_key=10, max_watchers=1))
    client = app.test_client()
    job_id = _job(client)
    stream = client.get(f"/api/v1/jobs/{job_id}/events", buffered=False)
    busy = client.get(f"/api/v1/jobs/{job_id}?wait=1")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
    assert busy.get_json()["error"]["type"] == "too_many_watchers"
    stream.close()


def test_watcher_caps_come_from_the_environment_and_fail_loudly():
    settings = Settings.from_env({"BLOOMQ_MAX_WATCHERS": "50", "BLOOMQ_MAX_WATCHERS_PER_KEY": "5"})
    assert (settings.max_watchers, settings.max_watchers_per_key) == (50, 5)
    assert (Settings().max_watchers, Settings().max_watchers_per_key) == (1000, 100)
    with pytest.raises(SettingsError, match="BLOOMQ_MAX_WATCHERS_PER_KEY"):
        Settings.from_env({"BLOOMQ_MAX_WATCHERS_PER_KEY": "0"})


def test_gunicorn_serves_with_gevent_and_takes_its_connection_count_from_the_environment(monkeypatch):
    monkeypatch.setitem(os.environ, "BLOOMQ_WEB_CONNECTIONS", "300")
    conf = runpy.run_path(str(GUNICORN_CONF))
    assert conf["worker_class"] == "gevent" and conf["worker_connections"] == 300
    monkeypatch.setitem(os.environ, "BLOOMQ_WEB_CONNECTIONS", "none")
    with pytest.raises(SystemExit, match="BLOOMQ_WEB_CONNECTIONS"):
        runpy.run_path(str(GUNICORN_CONF))

"""Webhooks: signed POSTs to a real local receiver, SSRF refusal at delivery, the outbox written with the
job change (real Redis), exclusive claims and leases, retries with the same event id, and deliveries that
stay within their deadline and byte cap against misbehaving local receivers."""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
import time

import pytest

from jobs.outbox import DUE_KEY, MAX_ATTEMPTS, Delivery, Outbox, stage
from jobs.schema import GenerateParameters, Job, JobError, new_job_id
from jobs.store import JobStore
from jobs.webhooks import (
    EVENT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookResponseTooLarge,
    WebhookSender,
    WebhookTimeout,
    WebhookURLError,
    check_url,
    verify,
)
from tests.support import wait_for
from worker.tasks import WebhookDispatcher

SECRET = "hook-secret"
LOCAL = ("127.0.0.0/8",)


@pytest.fixture()
def receiver():
    """A local HTTP server recording what it receives; answers with ``status`` (mutable)."""
    received: list[dict] = []
    state = {"status": 204}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers), "body": body})
            self.send_response(state["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received, state
    server.shutdown()


@pytest.fixture()
def raw_receiver():
    """A local TCP server that reads a request, then answers with ``answer(conn, stop)`` (set by the test)."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    state: dict = {}

    def serve(conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            try:
                state["answer"](conn, stop)
            except OSError:
                pass  # the client hung up: what these tests want

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook", state
    stop.set()
    listener.close()


def _job_with_hook(store: JobStore, url: str, events: tuple[str, ...] = ("completed",)) -> Job:
    job = Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=2),
              webhook=url, webhook_events=list(events))
    store.create(job)
    return job


def _delivery(job: Job, event: str = "completed") -> Delivery:
    return Delivery(id=f"{job.id}:{event}", job_id=job.id, event=event, attempt=1)


def _stage(redis_client, job_id: str, event: str = "completed", job_attempt: int = 0) -> None:
    with redis_client.pipeline(transaction=True) as pipe:
        stage(pipe, job_id, event, job_attempt)
        pipe.execute()


def _make_due(redis_client, delivery_id: str) -> None:
    """Skip the wait before a retry (what the clock would do)."""
    redis_client.zadd(DUE_KEY, {delivery_id: time.time()}, xx=True)


# -- the request ---------------------------------------------------------------------------------------


def test_delivery_is_signed_and_carries_the_job_resource_and_event_id(redis_client, receiver):
    url, received, _ = receiver
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    WebhookSender(store, SECRET, allow=LOCAL).deliver(_delivery(job))
    (hit,) = received
    headers = hit["headers"]
    assert json.loads(hit["body"])["id"] == job.id
    assert headers[EVENT_HEADER] == "completed" and headers[EVENT_ID_HEADER] == f"{job.id}:completed"
    assert verify(SECRET, int(headers[TIMESTAMP_HEADER]), hit["body"], headers[SIGNATURE_HEADER])
    assert not verify("another secret", int(headers[TIMESTAMP_HEADER]), hit["body"], headers[SIGNATURE_HEADER])


def test_a_private_address_is_refused_at_delivery_unless_allowed(redis_client, receiver):
    url, received, _ = receiver
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    with pytest.raises(WebhookURLError, match="non-public"):
        WebhookSender(store, SECRET).deliver(_delivery(job))
    assert received == []


def test_the_body_is_the_users_view_of_the_job_never_where_it_ran(redis_client, receiver):
    url, received, _ = receiver
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    running = store.start(job.id, "tiny@gpu-box-7.gpu3", "tiny@gpu-box-7.gpu3:4242")
    assert running.worker_instance == "tiny@gpu-box-7.gpu3:4242"
    WebhookSender(store, SECRET, allow=LOCAL).deliver(_delivery(job, "started"))
    (hit,) = received
    body = json.loads(hit["body"])
    assert body["id"] == job.id and body["status"] == "running"
    assert (body["worker"], body["worker_instance"]) == (None, None)
    assert b"gpu-box-7" not in hit["body"]


@pytest.mark.parametrize("address", [
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible loopback
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254, the cloud metadata address
    "::ffff:10.0.0.1",  # IPv4-mapped
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "64:ff9b:1::808:808",  # local-use NAT64: where its IPv4 part sits cannot be told
])
def test_ipv6_spellings_of_internal_addresses_are_refused_before_any_connection(address):
    with pytest.raises(WebhookURLError, match="non-public"):
        check_url(f"https://[{address}]/hook")


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2001:4860:4860::8888"])
def test_ipv6_forms_of_public_addresses_still_pass(address):
    assert check_url(f"https://[{address}]/hook") == [str(ipaddress.ip_address(address))]


# -- the outbox is written with the job change -------------------------------------------------------------


def test_the_store_queues_each_asked_for_event_with_the_change_that_causes_it(redis_client):
    store, outbox = JobStore(redis_client, 100), Outbox(redis_client)
    both = _job_with_hook(store, "https://hooks.example/x", ("started", "completed"))
    only_completed = _job_with_hook(store, "https://hooks.example/y")
    silent = Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=2))
    store.create(silent)
    assert outbox.pending() == {}  # nothing is due at creation

    for job in (both, only_completed, silent):
        store.start(job.id, "w")
    assert set(outbox.pending()) == {f"{both.id}:started:1"}

    store.fail(both.id, JobError(type="internal_error", message="x"), attempt=1)
    store.fail(only_completed.id, JobError(type="internal_error", message="x"), attempt=1)
    store.fail(silent.id, JobError(type="internal_error", message="x"), attempt=1)
    pending = outbox.pending()
    assert set(pending) == {f"{both.id}:started:1", f"{both.id}:completed", f"{only_completed.id}:completed"}
    delivery, due = pending[f"{both.id}:completed"]
    assert (delivery.job_id, delivery.event, delivery.attempt) == (both.id, "completed", 0)
    assert due <= time.time()


def test_a_queued_job_canceled_or_expired_queues_its_completed_event(redis_client):
    store, outbox = JobStore(redis_client, 100), Outbox(redis_client)
    canceled = _job_with_hook(store, "https://hooks.example/x")
    store.cancel(canceled.id)
    assert set(outbox.pending()) == {f"{canceled.id}:completed"}
    store.cancel(canceled.id)  # already final: no second event
    assert len(outbox.pending()) == 1


# -- claims ------------------------------------------------------------------------------------------------


class Recorder:
    """A sender that records what it was asked to deliver, and by which thread."""

    def __init__(self, fail: bool = False, hold: threading.Event | None = None) -> None:
        self.fail = fail
        self.hold = hold
        self.calls: list[tuple[Delivery, str]] = []
        self._lock = threading.Lock()

    def deliver(self, delivery: Delivery) -> None:
        with self._lock:
            self.calls.append((delivery, threading.current_thread().name))
        if self.hold is not None:
            self.hold.wait(30)
        if self.fail:
            raise RuntimeError("webhook answered 503")


def test_two_dispatchers_never_make_the_same_delivery(redis_client):
    ids = [new_job_id() for _ in range(40)]
    for job_id in ids:
        _stage(redis_client, job_id)
    senders = [Recorder(), Recorder()]
    dispatchers = [WebhookDispatcher(Outbox(redis_client), s, threads=2, lease_seconds=60, poll_seconds=0.05)
                   for s in senders]
    for dispatcher in dispatchers:
        dispatcher.start()
    try:
        wait_for(lambda: sum(len(s.calls) for s in senders) >= len(ids) and not Outbox(redis_client).pending(),
                 timeout=30, what="every delivery to be made")
    finally:
        for dispatcher in dispatchers:
            dispatcher.stop()
    made = [d.job_id for s in senders for d, _ in s.calls]
    assert sorted(made) == sorted(ids)  # each once: never by both


def test_a_held_delivery_is_not_claimed_again_until_its_claimer_dies_and_the_lease_lapses(redis_client):
    job_id = new_job_id()
    _stage(redis_client, job_id)
    first, second = Outbox(redis_client), Outbox(redis_client)
    (held,) = first.claim(10, lease_seconds=1.0)  # ...and its claimer dies
    assert held.delivery.attempt == 1
    assert second.claim(10, lease_seconds=60) == []

    (taken,) = wait_for(lambda: second.claim(10, lease_seconds=60), timeout=10, interval=0.1,
                        what="the lease to lapse")
    assert taken.delivery.id == held.delivery.id == f"{job_id}:completed"
    assert taken.delivery.attempt == 2  # the lapsed claim counted as an attempt
    assert first.complete(held) is False  # the first claimer, had it lived, can no longer touch it
    assert set(second.pending()) == {taken.delivery.id}
    assert second.complete(taken) is True
    assert second.pending() == {} and second.claimed() == set()


def test_deliveries_run_on_the_dispatchers_own_threads_one_claim_per_idle_thread(redis_client):
    for _ in range(5):
        _stage(redis_client, new_job_id())
    release = threading.Event()
    sender = Recorder(hold=release)
    outbox = Outbox(redis_client)
    dispatcher = WebhookDispatcher(outbox, sender, threads=2, lease_seconds=60, poll_seconds=0.05)
    try:
        assert dispatcher.dispatch_due() == 2
        wait_for(lambda: len(sender.calls) == 2, timeout=10, what="two deliveries under way")
        assert dispatcher.dispatch_due() == 0  # no idle thread: nothing more is claimed (and left waiting)
        assert len(outbox.claimed()) == 2 and len(outbox.pending()) == 5
    finally:
        release.set()
        dispatcher.stop()
    assert all(name.startswith("bloomq-webhook") for _, name in sender.calls)
    assert len(outbox.pending()) == 3


# -- retries -----------------------------------------------------------------------------------------------


def test_a_failing_delivery_is_retried_2_4_8_16_s_apart_with_one_event_id_then_dropped(redis_client, receiver,
                                                                                        caplog):
    url, received, state = receiver
    state["status"] = 503
    store, outbox = JobStore(redis_client, 100), Outbox(redis_client)
    job = _job_with_hook(store, url)
    store.cancel(job.id)  # final: its completed event is queued
    dispatcher = WebhookDispatcher(outbox, WebhookSender(store, SECRET, allow=LOCAL), threads=1, lease_seconds=60)
    delays = []
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        for _ in range(MAX_ATTEMPTS):
            (claim,) = outbox.claim(1, lease_seconds=60)
            before = time.time()
            dispatcher.deliver(claim)
            pending = outbox.pending()
            if pending:
                (_, due), = pending.values()
                delays.append(round(due - before))
                _make_due(redis_client, claim.delivery.id)
    dispatcher.stop()
    assert delays == [2, 4, 8, 16]
    assert outbox.pending() == {} and outbox.claimed() == set()  # dropped after the fifth attempt
    assert len(received) == MAX_ATTEMPTS
    assert {hit["headers"][EVENT_ID_HEADER] for hit in received} == {f"{job.id}:completed"}
    assert any(r.levelno == logging.ERROR and "failed for good" in r.getMessage() for r in caplog.records)


def test_a_delivery_that_gets_through_on_a_retry_is_removed(redis_client, receiver):
    url, received, state = receiver
    state["status"] = 500
    store, outbox = JobStore(redis_client, 100), Outbox(redis_client)
    job = _job_with_hook(store, url, ("started",))
    store.start(job.id, "w")
    dispatcher = WebhookDispatcher(outbox, WebhookSender(store, SECRET, allow=LOCAL), threads=1, lease_seconds=60)
    (claim,) = outbox.claim(1, lease_seconds=60)
    dispatcher.deliver(claim)
    _make_due(redis_client, claim.delivery.id)
    state["status"] = 204
    (claim,) = outbox.claim(1, lease_seconds=60)
    dispatcher.deliver(claim)
    dispatcher.stop()
    assert outbox.pending() == {}
    assert [hit["headers"][EVENT_ID_HEADER] for hit in received] == [f"{job.id}:started:1"] * 2


# -- bounded attempts --------------------------------------------------------------------------------------


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline(redis_client, raw_receiver):
    url, state = raw_receiver

    def drip(conn, stop):
        # One byte a second: no single read ever waits long enough to time out.
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
            conn.sendall(bytes([byte]))
            if stop.wait(1.0):
                return

    state["answer"] = drip
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    sender = WebhookSender(store, SECRET, allow=LOCAL, timeout=2.0)
    started = time.monotonic()
    with pytest.raises(WebhookTimeout):
        sender.deliver(_delivery(job))
    assert time.monotonic() - started < 2.0 + 5.0  # the deadline, plus a generous margin


def test_an_endless_response_body_is_not_read(redis_client, raw_receiver):
    url, state = raw_receiver

    def endless(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        while not stop.is_set():
            conn.sendall(b"x" * 65536)

    state["answer"] = endless
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    started = time.monotonic()
    WebhookSender(store, SECRET, allow=LOCAL, timeout=20.0).deliver(_delivery(job))  # a 200: delivered
    assert time.monotonic() - started < 10.0  # it did not wait for the body (nor the deadline)


def test_an_answer_past_the_byte_cap_is_refused_without_waiting_for_the_deadline(redis_client, raw_receiver):
    url, state = raw_receiver

    def huge_headers(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for n in range(60):  # 120 KiB of headers: within http.client's own limits, past the cap
            conn.sendall(b"X-Pad-%d: %s\r\n" % (n, b"p" * 2048))
        stop.wait(30)  # and never the blank line that ends them

    state["answer"] = huge_headers
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    started = time.monotonic()
    with pytest.raises(WebhookResponseTooLarge):
        WebhookSender(store, SECRET, allow=LOCAL, timeout=20.0, response_cap=64 * 1024).deliver(_delivery(job))
    assert time.monotonic() - started < 10.0

"""Webhook delivery: signed POSTs to a real local receiver, SSRF refusal at delivery, and the dispatcher's
own pool and retries (real Redis store; a fake Celery producer records the re-queued attempts)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from jobs.celery_app import WEBHOOK_RETRIES
from jobs.schema import GenerateParameters, Job, new_job_id
from jobs.store import JobStore
from jobs.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSender, WebhookURLError, verify
from worker.tasks import WebhookDispatcher

SECRET = "hook-secret"


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


def _job_with_hook(store: JobStore, url: str) -> Job:
    job = Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=2),
              webhook=url, webhook_events=["completed"])
    store.create(job)
    return job


def test_delivery_is_signed_and_carries_the_job_resource(redis_client, receiver):
    url, received, _ = receiver
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    WebhookSender(store, SECRET, allow=("127.0.0.0/8",)).deliver(job.id, "completed")
    (hit,) = received
    assert json.loads(hit["body"])["id"] == job.id
    assert verify(SECRET, int(hit["headers"][TIMESTAMP_HEADER]), hit["body"], hit["headers"][SIGNATURE_HEADER])
    assert not verify("another secret", int(hit["headers"][TIMESTAMP_HEADER]), hit["body"],
                      hit["headers"][SIGNATURE_HEADER])


def test_a_private_address_is_refused_at_delivery_unless_allowed(redis_client, receiver):
    url, received, _ = receiver
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    with pytest.raises(WebhookURLError, match="non-public"):
        WebhookSender(store, SECRET).deliver(job.id, "completed")
    assert received == []


class Producer:
    """Stands in for the Celery app: records what would be queued."""

    def __init__(self) -> None:
        self.sent: list[tuple[list, float | None]] = []

    def send_task(self, name, args, queue, routing_key, countdown=None):
        self.sent.append((args, countdown))


def test_a_failed_delivery_is_queued_again_with_growing_delays_then_given_up(redis_client, receiver):
    url, received, state = receiver
    state["status"] = 500
    store = JobStore(redis_client, 100)
    job = _job_with_hook(store, url)
    producer = Producer()
    dispatcher = WebhookDispatcher(producer, WebhookSender(store, SECRET, allow=("127.0.0.0/8",)), threads=1)
    for attempt in range(WEBHOOK_RETRIES + 1):
        dispatcher.deliver(job.id, "completed", attempt)
    assert len(received) == WEBHOOK_RETRIES + 1
    assert producer.sent == [([job.id, "completed", n + 1], 2 ** (n + 1)) for n in range(WEBHOOK_RETRIES)]


def test_a_slow_receiver_never_holds_the_calling_thread(redis_client):
    release = threading.Event()
    threads: list[str] = []

    class SlowSender:
        def deliver(self, job_id, event):
            threads.append(threading.current_thread().name)
            release.wait(10)

    dispatcher = WebhookDispatcher(Producer(), SlowSender(), threads=1)
    for _ in range(5):
        dispatcher.submit(new_job_id(), "completed", 0)  # what the Celery task does: returns at once
    release.set()
    dispatcher.shutdown()
    assert len(threads) == 5 and all(name.startswith("bloomq-webhook") for name in threads)

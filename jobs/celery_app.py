"""The Celery app both sides use, built from settings (never at import time)."""

from __future__ import annotations

import redis
from celery import Celery

from config.settings import Settings

TASK_GENERATE = "bloomq.generate"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url``: late acks, one message prefetched, results in our store."""
    sentinel = settings.redis_sentinel
    # Through Sentinel, kombu asks the sentinels for the master whenever it (re)connects.
    app = Celery("bloomq", broker=sentinel.broker_url if sentinel else settings.redis_url, set_as_current=False)
    sentinel_options = {"master_name": sentinel.master} if sentinel else {}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Our job store holds results and status; Celery's "unknown id looks PENDING" never applies.
        task_ignore_result=True,
        # A job is acknowledged only once it has a final result, so a worker that dies mid-job leaves
        # the message in Redis's unacked set, to be redelivered after the visibility timeout.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Look for messages whose visibility timeout has passed every 10 s (kombu's default scans
            # only every 10th sweep, i.e. ~100 s), so a dead worker's job comes back promptly.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # BRPOP the queues in the order the worker lists them (interactive first), not round robin.
            "queue_order_strategy": "priority",
            **sentinel_options,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def send_generate(app: Celery, job_id: str, queue: str) -> None:
    """Queue a generation job by task name (the web never imports the task); the task id is the job id,
    so the message can be found again (``withdraw_message``)."""
    app.send_task(TASK_GENERATE, args=[job_id], queue=queue, routing_key=queue, task_id=job_id)


WITHDRAW_SCAN = 1000  # newest messages of a queue looked through for one to withdraw


def withdraw_message(client: redis.Redis, queue: str, job_id: str) -> bool:
    """Take a job's message back out of its queue (its submission was refused after it was sent); False
    when it is no longer there (a worker took it: it will find no record, and acknowledge it).

    kombu pushes messages at the head of the queue's list, so a message just sent is among the first.
    """
    marker = f'"id": "{job_id}"'.encode()
    for raw in client.lrange(queue, 0, WITHDRAW_SCAN - 1):
        if marker in raw:
            return bool(client.lrem(queue, 1, raw))
    return False


"""Live jobs against the real stack: progress, streaming, cancel, deadlines, webhooks, idempotency, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import requests

from jobs.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.e2e.conftest import WEBHOOK_SECRET, make_stack
from tests.support import ROOT, WebhookReceiver, wait_for, wait_for_job


def _get(stack, job_id, **params):
    return requests.get(f"{stack.url}/api/v1/jobs/{job_id}", params=params, timeout=70).json()


def _wait_running(stack, job_id, tokens=1):
    def ready():
        job = _get(stack, job_id)
        return job["status"] == "running" and (job["output"] or {}).get("generated_tokens", 0) >= tokens
    wait_for(ready, timeout=60, interval=0.05, what="the job to be running with progress")


def test_poll_shows_progress_while_running(slow_stack):
    job = slow_stack.submit("Once upon a time", parameters={"max_new_tokens": 400})
    _wait_running(slow_stack, job["id"])
    first = _get(slow_stack, job["id"])
    second = wait_for(lambda: (j := _get(slow_stack, job["id"]))["output"]["generated_tokens"]
                      > first["output"]["generated_tokens"] and j, timeout=30, what="more progress")
    assert first["status"] == "running" and first["output"]["generated_text"]
    assert second["output"]["generated_tokens"] > first["output"]["generated_tokens"]
    assert second["output"]["generated_text"].startswith(first["output"]["generated_text"])
    done = wait_for_job(slow_stack.url, job["id"])
    assert done["output"]["generated_text"].startswith(second["output"]["generated_text"])


def _read_sse(url, headers=None, stop_after=None):
    events = []
    with requests.get(url, headers=headers or {}, stream=True, timeout=(5, 60)) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        fields = {}
        for line in response.iter_lines(decode_unicode=True):
            if line == "":
                if "event" in fields:
                    events.append(fields)
                    if fields["event"] == "done" or (stop_after and len(events) >= stop_after):
                        return events
                fields = {}
            elif not line.startswith((":", "retry")):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


def test_stream_delivers_tokens_then_done_and_resumes_without_gaps(slow_stack):
    job = slow_stack.submit("Il était une fois", parameters={"max_new_tokens": 150})
    url = f"{slow_stack.url}/api/v1/jobs/{job['id']}/events"
    head = _read_sse(url, stop_after=6)  # connect, read a few events, drop the connection
    rest = _read_sse(url, headers={"Last-Event-ID": head[-1]["id"]})
    events = head + rest
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids))  # no repeats
    assert events[-1]["event"] == "done"
    final = json.loads(events[-1]["data"])
    streamed = "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "token")
    assert streamed == final["output"]["generated_text"]  # no gaps
    assert sum(1 for e in events if e["event"] == "token") > 1
    replay = _read_sse(url)  # a finished job replays its whole stream and closes
    assert [e["id"] for e in replay] == ids


def test_cancel_a_running_job_keeps_its_text_and_spares_the_rest(slow_stack):
    victim = slow_stack.submit("Once upon a time", parameters={"max_new_tokens": 1500})
    mate = slow_stack.submit("从前有一座山", parameters={"max_new_tokens": 100})
    _wait_running(slow_stack, victim["id"], tokens=5)
    response = requests.post(f"{slow_stack.url}/api/v1/jobs/{victim['id']}/cancel", timeout=10)
    assert response.status_code == 202
    done = wait_for_job(slow_stack.url, victim["id"], timeout=30)
    assert done["status"] == "canceled" and done["output"]["finish_reason"] == "canceled"
    assert 0 < done["output"]["generated_tokens"] < 1500
    assert wait_for_job(slow_stack.url, mate["id"])["status"] == "succeeded"
    again = requests.post(f"{slow_stack.url}/api/v1/jobs/{victim['id']}/cancel", timeout=10).json()
    assert again["outcome"] == "already_final"


def test_a_running_job_past_its_timeout_fails_with_its_partial_text(slow_stack):
    job = slow_stack.submit("Once upon a time", parameters={"max_new_tokens": 1900}, timeout=1.5)
    done = wait_for_job(slow_stack.url, job["id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["type"] == "timeout"
    assert done["output"]["generated_tokens"] > 0 and done["output"]["generated_text"]


def test_webhook_is_signed_and_retried_until_it_gets_through(slow_stack):
    with WebhookReceiver(status=500) as hook:
        job = slow_stack.submit("Hello", parameters={"max_new_tokens": 5}, webhook=hook.url, webhook_events=["completed"])
        assert wait_for_job(slow_stack.url, job["id"])["status"] == "succeeded"
        wait_for(lambda: len(hook.calls) >= 2, timeout=60, what="two failed webhook attempts")
        hook.status = 204
        wait_for(lambda: hook.event_ids(answered=204), timeout=60, what="the webhook to get through")
        calls = list(hook.calls)
        headers, body = calls[-1]["headers"], calls[-1]["body"]
        assert verify(WEBHOOK_SECRET, int(headers[TIMESTAMP_HEADER]), body, headers[SIGNATURE_HEADER])
        assert not verify("wrong", int(headers[TIMESTAMP_HEADER]), body, headers[SIGNATURE_HEADER])
        delivered = json.loads(body)
        assert delivered["id"] == job["id"] and delivered["status"] == "succeeded"
        assert hook.event_ids() == [f"{job['id']}:completed"] * len(calls)  # one event, one id on every try
        gaps = [b["at"] - a["at"] for a, b in zip(calls, calls[1:])]
        assert gaps[1] > gaps[0] * 1.5  # backoff grows (2 s, then 4 s)


def test_idempotent_submit_over_http(slow_stack):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    headers = {"Idempotency-Key": "e2e-1"}
    a = requests.post(f"{slow_stack.url}/api/v1/jobs", json=body, headers=headers, timeout=10)
    b = requests.post(f"{slow_stack.url}/api/v1/jobs", json=body, headers=headers, timeout=10)
    assert (a.status_code, b.status_code) == (202, 200) and a.json()["id"] == b.json()["id"]


def _cli(slow_stack, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cli", "--url", slow_stack.url, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_submit_wait_stream_status_cancel_models(slow_stack):
    waited = _cli(slow_stack, "submit", "Hello", "--param", "max_new_tokens=20", "--wait")
    assert waited.returncode == 0, waited.stderr
    job = json.loads(waited.stdout)
    assert job["status"] == "succeeded" and job["output"]["generated_tokens"] == 20
    assert "succeeded: 100%" in waited.stderr and "20/20" in waited.stderr  # the bar's last figures were shown

    streamed = _cli(slow_stack, "submit", "Hello", "-p", "max_new_tokens=20", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == job["output"]["generated_text"]  # greedy: the same text

    status = _cli(slow_stack, "status", job["id"])
    assert json.loads(status.stdout)["id"] == job["id"]

    job_id = _cli(slow_stack, "submit", "Once upon a time", "-p", "max_new_tokens=1500").stdout.strip()
    _wait_running(slow_stack, job_id)
    cancelled = _cli(slow_stack, "cancel", job_id)
    assert cancelled.returncode == 0 and "stops it" in cancelled.stdout
    assert wait_for_job(slow_stack.url, job_id)["status"] == "canceled"

    models = _cli(slow_stack, "models")
    assert "slow-bloom" in models.stdout and "workers=1" in models.stdout

    bad = _cli(slow_stack, "submit", "Hello", "-p", "top_p=7")
    assert bad.returncode == 2 and "parameters.top_p" in bad.stderr


def test_queued_jobs_cancelled_or_expired_before_any_worker_never_run(request, tmp_path_factory, tiny_model_dir):
    stack = make_stack(request, tmp_path_factory, tiny_model_dir)
    try:
        stack.start_web()
        cancelled = stack.submit("Hello", parameters={"max_new_tokens": 5})
        expiring = stack.submit("Hello", parameters={"max_new_tokens": 5}, timeout=1)
        assert requests.post(f"{stack.url}/api/v1/jobs/{cancelled['id']}/cancel", timeout=10).json()["outcome"] == "canceled"
        # Read past its deadline, a queued job is failed as expired by the web itself, no worker needed.
        wait_for(lambda: _get(stack, expiring["id"])["status"] == "failed", timeout=30, what="the job to expire")
        stack.start_worker()
        normal = wait_for_job(stack.url, stack.submit("Hello", parameters={"max_new_tokens": 5})["id"])
        assert normal["status"] == "succeeded"  # the worker took and served later work
        for job_id in (cancelled["id"], expiring["id"]):
            job = _get(stack, job_id)
            assert job["attempts"] == 0 and job["output"] is None
        assert _get(stack, cancelled["id"])["status"] == "canceled"
        assert _get(stack, expiring["id"])["error"]["type"] == "expired"
    finally:
        stack.stop()

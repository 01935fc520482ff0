"""The real stack with API keys on: isolation, metrics for operators, JSON logs carrying the job id, and
keys made and revoked at run time with the command-line client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis
import requests

from tests.e2e.conftest import running_stack
from tests.support import ROOT, csrf_token, wait_for, wait_for_job

KEYS = ("key-alpha-1", "key-beta-2")
OPERATOR = "key-operator-3"


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_keys_isolate_jobs_metrics_need_a_key_and_logs_follow_a_job(request, tmp_path_factory, tiny_model_dir):
    env = {"BLOOMQ_API_KEYS": ",".join(KEYS), "BLOOMQ_OPERATOR_KEYS": OPERATOR, "BLOOMQ_RATE_LIMIT": "100/minute"}
    with running_stack(request, tmp_path_factory, tiny_model_dir, **env) as stack:
        base = f"{stack.url}/api/v1"
        assert requests.post(f"{base}/jobs", json={"inputs": "hi"}, timeout=5).status_code == 401
        job = requests.post(f"{base}/jobs", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}},
                            headers=_auth(KEYS[0]), timeout=5).json()

        def done():
            body = requests.get(f"{base}/jobs/{job['id']}?wait=5", headers=_auth(KEYS[0]), timeout=10).json()
            return body if body["status"] == "succeeded" else None

        final = wait_for(done, timeout=60, what="the job")
        assert final["output"]["generated_tokens"] == 6
        assert requests.get(f"{base}/jobs/{job['id']}", headers=_auth(KEYS[1]), timeout=5).status_code == 404
        assert requests.get(f"{stack.url}/metrics", timeout=5).status_code == 401
        assert requests.get(f"{stack.url}/metrics", headers=_auth(KEYS[1]), timeout=5).status_code == 403
        metrics = requests.get(f"{stack.url}/metrics", headers=_auth(OPERATOR), timeout=5).text
        assert 'bloomq_jobs_finished_total{model="tiny-bloom",status="succeeded"} 1.0' in metrics
        assert 'bloomq_live_workers{model="tiny-bloom"} 1.0' in metrics
        wait_for(lambda: "bloomq_batch_size_count" in requests.get(f"{stack.url}/metrics", headers=_auth(OPERATOR),
                                                                    timeout=5).text,
                 timeout=15, what="the worker's batch sizes to reach the metrics")
        assert requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200
        (summary,) = requests.get(f"{base}/workers", headers=_auth(KEYS[0]), timeout=5).json()["workers"]
        assert set(summary) == {"model", "batch_capacity", "jobs_running", "last_seen"}  # a user's trimmed view
        (full,) = requests.get(f"{base}/workers", headers=_auth(OPERATOR), timeout=5).json()["workers"]
        assert {"host", "pid", "instance", "source"} <= set(full)
        # One job, followed by its id through the JSON logs of the web and of the worker.
        for proc in (stack.web, stack.workers[0]):
            records = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
            assert any(r.get("job_id") == job["id"] for r in records), proc.log_path

        _keys_made_and_revoked_with_the_cli(stack)
        _a_daily_token_quota_is_never_passed_and_usage_adds_up(stack)


def _cli(stack, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOOMQ_URL": stack.url, "BLOOMQ_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _keys_made_and_revoked_with_the_cli(stack) -> None:
    made = _cli(stack, OPERATOR, "keys", "create", "team-a", "--tokens-per-day", "5000", "--max-active-jobs", "3")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.splitlines()[0]
    listed = _cli(stack, OPERATOR, "keys", "list")
    assert listed.returncode == 0 and secret not in listed.stdout
    (row,) = [line.split() for line in listed.stdout.splitlines() if line.startswith("team-a")]
    assert row[:5] == ["team-a", "user", "5000", "3", "-"]
    refused = _cli(stack, KEYS[0], "keys", "list")  # a user key
    assert refused.returncode == 2 and "403" in refused.stderr

    # The new key works at once, over the API and signed in on the pages.
    job = requests.post(f"{stack.url}/api/v1/jobs", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
                        headers=_auth(secret), timeout=5)
    assert job.status_code == 202
    assert wait_for_job(stack.url, job.json()["id"], headers=_auth(secret))["status"] == "succeeded"
    browser = requests.Session()
    token = csrf_token(browser.get(f"{stack.url}/login", timeout=5).text)
    signed_in = browser.post(f"{stack.url}/login", data={"api_key": secret, "csrf_token": token}, timeout=5,
                             allow_redirects=False)
    assert signed_in.status_code == 302
    assert browser.get(f"{stack.url}/", timeout=5, allow_redirects=False).status_code == 200

    updated = _cli(stack, OPERATOR, "keys", "update", "team-a", "--max-active-jobs", "none")
    assert updated.returncode == 0
    assert updated.stdout.splitlines()[1].split()[:5] == ["team-a", "user", "5000", "-", "-"]

    # Revoked: refused at the next request, by every web process (several requests, so several processes
    # answer), and the browser session ends.
    revoked = _cli(stack, OPERATOR, "keys", "revoke", "team-a")
    assert revoked.returncode == 0, revoked.stderr
    for _ in range(6):
        assert requests.get(f"{stack.url}/api/v1/jobs", headers=_auth(secret), timeout=5).status_code == 401
    page = browser.get(f"{stack.url}/", timeout=5, allow_redirects=False)
    assert page.status_code == 302 and "/login" in page.headers["Location"]


def _a_daily_token_quota_is_never_passed_and_usage_adds_up(stack) -> None:
    made = requests.post(f"{stack.url}/api/v1/keys", json={"name": "small", "tokens_per_day": 60},
                         headers=_auth(OPERATOR), timeout=5)
    assert made.status_code == 201
    secret = made.json()["secret"]
    accepted, refused = [], None
    for _ in range(20):
        answer = requests.post(f"{stack.url}/api/v1/jobs", headers=_auth(secret), timeout=5,
                               json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}})
        if answer.status_code != 202:
            refused = answer
            break
        accepted.append(answer.json()["id"])
    assert refused is not None and refused.status_code == 429 and accepted
    assert refused.json()["error"]["type"] == "quota_exceeded" and refused.json()["error"]["limit"] == "tokens_per_day"
    assert int(refused.headers["Retry-After"]) > 0
    done = [wait_for_job(stack.url, job_id, headers=_auth(secret)) for job_id in accepted]
    assert all(job["status"] == "succeeded" for job in done)
    used = sum(job["output"]["prompt_tokens"] + job["output"]["generated_tokens"] for job in done)
    assert used <= 60
    usage = requests.get(f"{stack.url}/api/v1/usage", headers=_auth(secret), timeout=5).json()
    totals = {"prompt_tokens": sum(job["output"]["prompt_tokens"] for job in done),
              "completion_tokens": sum(job["output"]["generated_tokens"] for job in done), "jobs": len(done)}
    assert usage["totals"] == totals
    report = _cli(stack, OPERATOR, "usage", "--key", "small")  # an operator reads another key's figures
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[-1].split() == ["total", *(str(totals[k]) for k in totals)]
    _no_secret_in_redis(stack, secret)


def _no_secret_in_redis(stack, secret: str) -> None:
    """Every key and every value in Redis, whatever its type, is free of the secret."""
    client = redis.Redis.from_url(stack.redis.url)
    needle = secret.encode()
    readers = {b"string": lambda k: [client.get(k)], b"list": lambda k: client.lrange(k, 0, -1),
               b"set": client.smembers, b"zset": lambda k: client.zrange(k, 0, -1),
               b"hash": lambda k: [x for pair in client.hgetall(k).items() for x in pair],
               b"stream": lambda k: [x for _, fields in client.xrange(k) for pair in fields.items() for x in pair]}
    scanned = 0
    for key in client.scan_iter(count=1000):
        assert needle not in key
        values = readers[client.type(key)](key)
        assert all(needle not in (value or b"") for value in values), key
        scanned += 1
    assert scanned > 20  # jobs, streams, keys, usage: the scan saw the stack's data

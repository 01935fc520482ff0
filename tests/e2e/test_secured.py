"""The real stack with API keys on: isolation, metrics behind a key, JSON logs carrying the job id."""

from __future__ import annotations

import json

import requests

from tests.e2e.conftest import running_stack
from tests.support import wait_for

KEYS = ("key-alpha-1", "key-beta-2")


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_keys_isolate_jobs_metrics_need_a_key_and_logs_follow_a_job(request, tmp_path_factory, tiny_model_dir):
    env = {"BLOOMQ_API_KEYS": ",".join(KEYS), "BLOOMQ_RATE_LIMIT": "100/minute"}
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
        metrics = requests.get(f"{stack.url}/metrics", headers=_auth(KEYS[1]), timeout=5).text
        assert 'bloomq_jobs_finished_total{model="tiny-bloom",status="succeeded"} 1.0' in metrics
        assert 'bloomq_live_workers{model="tiny-bloom"} 1.0' in metrics
        wait_for(lambda: "bloomq_batch_size_count" in requests.get(f"{stack.url}/metrics", headers=_auth(KEYS[1]),
                                                                    timeout=5).text,
                 timeout=15, what="the worker's batch sizes to reach the metrics")
        assert requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200
        # One job, followed by its id through the JSON logs of the web and of the worker.
        for proc in (stack.web, stack.workers[0]):
            records = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
            assert any(r.get("job_id") == job["id"] for r in records), proc.log_path

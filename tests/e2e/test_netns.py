"""Scale-out on separate network hosts: Redis, the web and two worker machines in their own network
namespaces, joined by a bridge. Needs root (it skips, saying why, where namespaces cannot be made)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ARTIFACTS
from tests.support import Proc, service_env, wait_for, wait_for_job

HOSTS = {"redis": 1, "web": 2, "a": 3, "b": 4}


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"bqprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace here: {exc.stderr.strip()}"
    _run("ip", "netns", "delete", probe)
    return None


class Network:
    """A switch namespace with a bridge, one namespace per host, and a veth from this test to the bridge."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self.switch = f"bqsw{tag}"
        self.ns = {host: f"bq{host}{tag}" for host in HOSTS}
        self.client_if = f"bqc{tag}"
        self.created: list[str] = []

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    def up(self) -> None:
        _run("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        sw = ["ip", "netns", "exec", self.switch]
        _run(*sw, "ip", "link", "add", "br0", "type", "bridge")
        _run(*sw, "ip", "link", "set", "br0", "up")
        for host, ns in self.ns.items():
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            inside = ["ip", "netns", "exec", ns]
            _run(*inside, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"p-{host}", "netns", self.switch)
            _run(*sw, "ip", "link", "set", f"p-{host}", "master", "br0", "up")
            _run(*inside, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
        # This test process reaches the web through its own leg on the bridge.
        _run("ip", "link", "add", self.client_if, "type", "veth", "peer", "name", "p-client", "netns", self.switch)
        _run(*sw, "ip", "link", "set", "p-client", "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.subnet}.10/24", "dev", self.client_if)
        _run("ip", "link", "set", self.client_if, "up")

    def link(self, host: str, state: str) -> None:
        _run("ip", "netns", "exec", self.ns[host], "ip", "link", "set", "eth0", state)

    def down(self) -> None:
        subprocess.run(["ip", "link", "delete", self.client_if], capture_output=True)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@contextlib.contextmanager
def cluster(tiny_model_dir: Path, slow_model_dir: Path) -> Iterator[tuple[Network, dict]]:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    net = Network()
    logs = ARTIFACTS / "logs" / "netns"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    launchers: dict[tuple[str, str], Proc] = {}  # by (host, model)
    state: dict = {"procs": procs, "logs": logs, "launchers": launchers}
    try:
        net.up()
        redis_url = f"redis://{net.ip('redis')}:6379/0"
        procs.append(Proc(["ip", "netns", "exec", net.ns["redis"], shutil.which("redis-server"), "--bind",
                           net.ip("redis"), "--port", "6379", "--save", "", "--appendonly", "no",
                           "--protected-mode", "no"], dict(os.environ), logs / "redis.log").start())
        env = service_env(redis_url, str(slow_model_dir), BLOOMQ_HOST=net.ip("web"), BLOOMQ_PORT="5000",
                          BLOOMQ_MODELS=str(tiny_model_dir))
        web = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "web:create_app()"]
        procs.append(Proc(["ip", "netns", "exec", net.ns["web"], *web], env, logs / "web.log").start())
        base = f"http://{net.ip('web')}:5000"
        wait_for(lambda: _ok(f"{base}/healthz"), timeout=30, what="the web host")

        def workers(*placements: tuple[str, Path]) -> None:
            """Start a worker machine's launcher for each (host, model), side by side; wait until each one
            announces itself."""
            before = {w["instance"] for w in _workers(base)}
            for host, model in placements:
                wenv = service_env(redis_url, str(model), BLOOMQ_WORKER_HOST=f"host-{host}")
                cmd = ["ip", "netns", "exec", net.ns[host], sys.executable, "-m", "worker", "--gpus", "none"]
                proc = Proc(cmd, wenv, logs / f"worker-{host}-{model.name}-{len(procs)}.log").start()
                procs.append(proc)
                launchers[(host, model.name)] = proc
            for host, model in placements:
                wait_for(lambda h=host, m=model: any(w["instance"] not in before and w["host"] == f"host-{h}"
                                                     and w["model"] == m.name for w in _workers(base)),
                         timeout=90, what=f"a {model.name} worker on host {host}")

        state.update(base=base, workers=workers)
        yield net, state
    finally:
        for proc in reversed(procs):
            proc.kill()
        net.down()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _workers(base: str) -> list[dict]:
    try:
        return requests.get(f"{base}/api/v1/workers", timeout=5).json()["workers"]
    except (requests.RequestException, ValueError):
        return []


def _submit(base: str, model: str, tokens: int) -> str:
    body = {"inputs": "Once upon a time", "model": model, "parameters": {"max_new_tokens": tokens}}
    response = requests.post(f"{base}/api/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _job(base: str, job_id: str) -> dict:
    return requests.get(f"{base}/api/v1/jobs/{job_id}", timeout=10).json()


def _running_on(base: str, job_id: str) -> str | None:
    job = _job(base, job_id)
    if job["status"] == "running" and job["worker"]:
        return job["worker"].split("@", 1)[1].split(".", 1)[0]  # host-a / host-b
    return None


def test_workers_on_separate_hosts_route_fail_over_and_fence_late_results(tiny_model_dir, slow_model_dir):
    with cluster(tiny_model_dir, slow_model_dir) as (net, c):
        base = c["base"]
        c["workers"](("a", slow_model_dir), ("b", tiny_model_dir))

        # 1. Routing: each model's jobs go to the host serving it.
        ids = [(_submit(base, m, 5), m) for m in ("slow-bloom", "tiny-bloom") * 2]
        for job_id, model in ids:
            done = wait_for_job(base, job_id)
            assert done["status"] == "succeeded"
            assert done["worker"] == f"{model}@host-{'a' if model == 'slow-bloom' else 'b'}.cpu"

        # 2. The worker machine A dies (SIGKILL) mid-job: B takes the job over within a minute.
        c["workers"](("b", slow_model_dir))
        job_id = _submit(base, "slow-bloom", 300)
        host = wait_for(lambda: _running_on(base, job_id), timeout=30, what="the job to start")
        c["launchers"][(host[-1], "slow-bloom")].kill()  # the launcher and its worker: the machine is gone
        killed_at = time.monotonic()
        done = wait_for_job(base, job_id, timeout=90)
        assert time.monotonic() - killed_at < 60
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert not done["worker"].startswith(f"slow-bloom@{host}")

        # 3. A slow-bloom worker runs on both hosts again. The link of the host running the next job goes
        #    down mid-job; the other host takes over; when the link comes back, the cut-off host's late
        #    result is refused: one final result.
        c["workers"]((host[-1], slow_model_dir))
        job_id = _submit(base, "slow-bloom", 400)
        cut = wait_for(lambda: _running_on(base, job_id), timeout=30, what="the job to start")
        net.link(cut[-1], "down")
        try:
            wait_for(lambda: (_running_on(base, job_id) or cut) != cut, timeout=60, interval=0.5,
                     what="another host to take the job over")
        finally:
            net.link(cut[-1], "up")
        done = wait_for_job(base, job_id, timeout=120)
        assert done["status"] == "succeeded" and not done["worker"].startswith(f"slow-bloom@{cut}")
        # The cut-off host reconnects and its own attempt ends: stopped as taken over, or its result refused.
        cut_worker = c["launchers"][(cut[-1], "slow-bloom")]
        wait_for(lambda: any(line in cut_worker.log() for line in (f"job {job_id}: not stored",
                                                                   f"job {job_id}: attempt 1 was stopped")),
                 timeout=120, what="the cut-off host to give up its attempt")
        assert _job(base, job_id) == done
        logs = "".join(p.log() for p in c["procs"])
        assert logs.count(f"job {job_id}: succeeded") == 1

"""Real processes for tests: redis-server, the worker launcher and gunicorn, on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free port, data in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), timeout=10, what="redis-server to answer")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (SIGTERM: Redis flushes its append-only file) and start again on the same port and data."""
        self.stop()
        time.sleep(down_seconds)
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def service_env(redis_url: str, model: str, **extra: str) -> dict[str, str]:
    """The environment a bloomq process runs with in tests."""
    env = dict(os.environ)
    env.update(
        {
            "BLOOMQ_REDIS_URL": redis_url,
            "BLOOMQ_MODEL": model,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "BLOOMQ_HEARTBEAT_SECONDS": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     process_group=0)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the launcher and its worker children)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


WORKER_COMMAND = ("-m", "worker", "--gpus", "none")


def start_worker(redis_url: str, model: str, log_path: Path, command: tuple[str, ...] = WORKER_COMMAND,
                 **env: str) -> Proc:
    """``python -m worker --gpus none`` (or another ``command``) against ``redis_url``."""
    return Proc([sys.executable, *command], service_env(redis_url, model, **env), log_path).start()


def start_web(redis_url: str, model: str, log_path: Path, port: int, **env: str) -> Proc:
    """gunicorn with the project's config, as the README runs it."""
    args = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "web:create_app()"]
    return Proc(args, service_env(redis_url, model, BLOOMQ_PORT=str(port), **env), log_path).start()


def live_workers(base_url: str, headers: dict[str, str] | None = None) -> int:
    try:
        models = requests.get(f"{base_url}/api/v1/models", headers=headers, timeout=5).json()["models"]
    except (requests.RequestException, ValueError, KeyError):
        return 0
    return sum(m["workers"] for m in models)


def wait_for_job(base_url: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll the job until it is terminal; return the resource."""

    def terminal() -> dict[str, Any] | None:
        body = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=5).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(terminal, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")


def csrf_token(page_html: str) -> str:
    """The CSRF token a page embeds in its forms."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page_html)
    assert match, "the page has no CSRF token"
    return match.group(1)

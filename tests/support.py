"""Real processes for tests: redis-server, the worker launcher and gunicorn, on free ports."""

from __future__ import annotations

import collections
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

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False,
                 args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.args = args  # more redis-server options, e.g. ("--replicaof", host, port)
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
             "--dir", str(self.workdir), *self.args],
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


    def kill(self) -> None:
        """SIGKILL: the machine is gone, nothing is flushed."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class SentinelCluster:
    """A Redis master, its replicas and three sentinels (``redis-server --sentinel``), on free ports.

    Sentinels judge a master down after ``down_after_ms`` and fail over with a quorum of two, so a test
    sees a failover within a few seconds of a kill.
    """

    def __init__(self, workdir: Path, replicas: int = 1, master_name: str = "mymaster", appendonly: bool = False,
                 down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        # Diskless sync at once, so a replica (or a former master rejoining) is in sync in milliseconds.
        fast_sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        self.nodes = [RedisServer(workdir / "node-0", appendonly=appendonly, args=fast_sync)]
        master_port = str(self.nodes[0].port)
        self.nodes += [RedisServer(workdir / f"node-{i}", appendonly=appendonly,
                                   args=(*fast_sync, "--replicaof", "127.0.0.1", master_port))
                       for i in range(1, replicas + 1)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The Sentinel URL as bloomq (and Celery) read it."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def start(self) -> SentinelCluster:
        for node in self.nodes:
            node.start()
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        for i in range(len(self.sentinel_ports)):
            self.sentinels.append(self._start_sentinel(binary, i))
        # Ready when every sentinel knows every replica and the two other sentinels, and replicas are in sync.
        wait_for(self._ready, timeout=30, interval=0.2, what="the sentinels to see the replicas and each other")
        return self

    def _start_sentinel(self, binary: str, i: int) -> subprocess.Popen[bytes]:
        """Sentinel ``i``, answering; on another free port when its port was taken meanwhile (another test
        process can bind it between choosing and starting)."""
        for _ in range(5):
            port = self.sentinel_ports[i]
            conf = self.workdir / f"sentinel-{port}.conf"  # Sentinel rewrites its config: one file each
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.nodes[0].port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} 2000", "",
            ]))
            proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
            def up(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                return proc.poll() is not None or self._sentinel_answers(port)

            wait_for(up, timeout=10, interval=0.05, what=f"sentinel {port} to answer")
            if proc.poll() is None:
                return proc
            self.sentinel_ports[i] = free_port()
        raise AssertionError("no sentinel could start: every port tried was taken")

    def _sentinel_answers(self, port: int) -> bool:
        """A sentinel watching our master answers on ``port`` (not some other server that took it)."""
        try:
            return bool(redis.Redis(port=port, socket_timeout=0.5).sentinel_master(self.master_name))
        except redis.RedisError:
            return False

    def _ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                state = redis.Redis(port=port, socket_timeout=1).sentinel_master(self.master_name)
                if state["num-slaves"] < len(self.nodes) - 1 or state["num-other-sentinels"] < 2:
                    return False
            return all(redis.Redis(port=node.port).info("replication").get("master_link_status") == "up"
                       for node in self.nodes[1:])
        except redis.RedisError:
            return False

    def master_port(self) -> int | None:
        """The port of the master as a majority of the sentinels see it (None while they disagree)."""
        seen = collections.Counter()
        for port in self.sentinel_ports:
            try:
                _host, master = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(
                    self.master_name)
            except (redis.RedisError, TypeError):
                continue
            seen[int(master)] += 1
        port, votes = seen.most_common(1)[0] if seen else (None, 0)
        return port if votes >= 2 else None

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def wait_for_failover(self, old_port: int, timeout: float = 30) -> RedisServer:
        """The new master, once a majority of the sentinels name another node than ``old_port``."""
        port = wait_for(lambda: (p := self.master_port()) not in (None, old_port) and p, timeout=timeout,
                        interval=0.1, what="the sentinels to fail over")
        return self.node(port)

    def role(self, node: RedisServer) -> str:
        return redis.Redis(port=node.port, socket_timeout=1).info("replication")["role"]

    def stop(self) -> None:
        for sentinel in self.sentinels:
            if sentinel.poll() is None:
                sentinel.terminate()
                sentinel.wait(timeout=10)
        for node in self.nodes:
            node.stop()


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
            # The stacks' texts are compared with float32 generate() token for token; the auto policy (bf16 on a
            # CPU with native bf16) runs in the make-run test (tests/e2e/test_run_stack.py).
            "BLOOMQ_DTYPE": "float32",
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
    """gunicorn with the project's config, as the docs run it."""
    args = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "web:create_app()"]
    return Proc(args, service_env(redis_url, model, BLOOMQ_PORT=str(port), **env), log_path).start()


def live_workers(base_url: str, headers: dict[str, str] | None = None) -> int:
    try:
        models = requests.get(f"{base_url}/api/v1/models", headers=headers, timeout=5).json()["models"]
    except (requests.RequestException, ValueError, KeyError):
        return 0
    return sum(m["workers"] for m in models)


def wait_for_job(base_url: str, job_id: str, timeout: float = 60, headers: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Poll the job until it is terminal (with ``headers``, e.g. an API key); return the resource."""

    def terminal() -> dict[str, Any] | None:
        body = requests.get(f"{base_url}/api/v1/jobs/{job_id}", headers=headers, timeout=5).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(terminal, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")


def csrf_token(page_html: str) -> str:
    """The CSRF token a page embeds in its forms."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page_html)
    assert match, "the page has no CSRF token"
    return match.group(1)


class WebhookReceiver:
    """A local HTTP server that records every webhook POST (headers, JSON body) and answers ``status``
    (settable while it runs); use as a context manager."""

    def __init__(self, status: int = 204) -> None:
        import http.server
        import threading

        self.status = status
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = receiver.status
                receiver.calls.append({"headers": dict(self.headers), "body": body, "at": time.monotonic(),
                                       "answered": answer})
                self.send_response(answer)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def event_ids(self, answered: int | None = None) -> list[str]:
        """The ``X-Bloomq-Event-Id`` of each call so far (only those answered ``answered``, if given)."""
        return [c["headers"]["X-Bloomq-Event-Id"] for c in list(self.calls)
                if answered is None or c["answered"] == answered]


"""``make run``: the whole stack in the foreground -- Redis (if none answers), workers, web.

Ctrl-C stops everything this started. If any part exits, the rest are stopped too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.sentinel import DEFAULT_SENTINEL_MASTER  # noqa: E402
from config.settings import Settings  # noqa: E402
from config.values import SettingsError  # noqa: E402
from jobs.connection import connect  # noqa: E402


def redis_answers(url: str, sentinel_master: str = DEFAULT_SENTINEL_MASTER) -> bool:
    try:
        if url.startswith("sentinel:"):
            return bool(connect(url, sentinel_master).ping())
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(url: str) -> subprocess.Popen[bytes]:
    parsed = urlparse(url)
    if parsed.scheme == "sentinel":
        sys.exit(f"no master answers through the sentinels of BLOOMQ_REDIS_URL={url}; start the Redis nodes and "
                 "sentinels first (see docs/operating/high-availability.md)")
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"nothing answers at BLOOMQ_REDIS_URL={url}, and it is not local, so it cannot be started here")
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: install it (e.g. `apt-get install redis-server`) or set "
                 "BLOOMQ_REDIS_URL to a running Redis")
    port = str(parsed.port or 6379)
    print(f"[stack] no Redis at {url}; starting redis-server on port {port}", flush=True)
    proc = subprocess.Popen(
        [binary, "--port", port, "--bind", parsed.hostname, "--save", "", "--appendonly", "no"], process_group=0
    )
    for _ in range(50):
        if redis_answers(url):
            return proc
        time.sleep(0.1)
    proc.terminate()
    sys.exit("redis-server did not come up")


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"[stack] {exc}")
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    if not redis_answers(settings.redis_url, settings.redis_sentinel_master):
        children.append(("redis", start_redis(settings.redis_url)))
    else:
        print(f"[stack] using the Redis that answers at {settings.redis_url} (BLOOMQ_REDIS_URL); its jobs and keys "
              "stay there after Ctrl-C", flush=True)
    python = sys.executable
    children.append(("worker", subprocess.Popen([python, "-m", "worker"], cwd=ROOT, process_group=0)))
    gunicorn = [python, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "web:create_app()"]
    children.append(("web", subprocess.Popen(gunicorn, cwd=ROOT, process_group=0)))
    # Children have their own process groups: Ctrl-C reaches only this script, which stops them in order.
    print(f"[stack] web on http://{settings.host}:{settings.port}/ , model {settings.model}; Ctrl-C stops",
          flush=True)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = 0
    while not stopping:
        for name, proc in children:
            code = proc.poll()
            if code is not None:
                print(f"[stack] {name} exited with status {code}; stopping the rest", flush=True)
                status = code or 1
                stopping = True
                break
        time.sleep(0.3)
    # Web and workers first, Redis last, so nothing loses its broker while draining.
    for _name, proc in reversed(children):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if _name != "worker" else signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

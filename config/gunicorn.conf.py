"""gunicorn settings for the web process: ``gunicorn -c config/gunicorn.conf.py 'web:create_app()'``."""

import os
import resource


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SystemExit(f"{name}={raw!r} is not valid: must be a positive integer")
    return value


port = _positive_int("BLOOMQ_PORT", 5000)
if port > 65535:
    raise SystemExit(f"BLOOMQ_PORT={port} is not valid: must be a TCP port (1 to 65535)")
host = os.environ.get("BLOOMQ_HOST", "").strip() or "127.0.0.1"
bind = f"{host}:{port}"
workers = _positive_int("BLOOMQ_WEB_WORKERS", 2)
# Most of the web's time is spent waiting: an event stream (up to BLOOMQ_STREAM_MAX_SECONDS) or a long
# poll (up to 60 s) waits on Redis. With gevent each request is a greenlet, and the worker monkey-patches
# sockets and locks before the app is imported, so redis-py's blocking reads (a job feed's XREAD, a long
# poll's pub/sub) and Celery's producer yield to the other greenlets: a waiting client is a parked
# greenlet, not an OS thread, and one process holds thousands of them. A thread pool (gthread) ran out at
# 2 x 8.
worker_class = "gevent"
# Open connections one worker process serves at once (streams, long polls and ordinary requests).
# Keep it above BLOOMQ_MAX_WATCHERS, so ordinary requests still get in when watchers are at their cap.
worker_connections = _positive_int("BLOOMQ_WEB_CONNECTIONS", 2000)
# The gevent worker reports to the arbiter from its own loop (once a second), not from a request, so a
# stream longer than this is not cut; only a worker whose loop is stuck this long is restarted.
timeout = 60
accesslog = "-"

# A connection holds up to two descriptors (the client's socket, and a long poll's Redis subscription):
# raise the soft limit as far as the hard limit allows, before the workers fork, so they inherit it.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_wanted = 2 * worker_connections + 256
if _soft != resource.RLIM_INFINITY and _soft < _wanted:
    _limit = _wanted if _hard == resource.RLIM_INFINITY else min(_wanted, _hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, _limit), _hard))

"""The app factory: the Flask app with every surface's routes over the shared job store.

    gunicorn --bind 127.0.0.1:5000 'web:create_app()'
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis
from flask import Flask

from config.logs import configure_logging
from config.models import ModelRegistry
from config.settings import Settings
from jobs.accounts import KeyBook
from jobs.batches import BatchStore
from jobs.celery_app import make_celery
from jobs.connection import connect
from jobs.store import JobStore
from jobs.workers import WorkerDirectory
from web.http.auth import csrf, init_auth
from web.http.bodies import allow_batch_files
from web.http.errors import register_error_handlers
from web.http.feeds import JobFeeds
from web.http.limits import charge, hold_quota, limiter
from web.http.watchers import WatcherSlots
from web.native.keys import keys_api
from web.native.routes import api
from web.native.usage import usage_api
from web.openai.batches import batches_api
from web.openai.routes import openai_api
from web.ops.dashboard import dashboard_api
from web.pages.views import views
from web.services.dashboard import Dashboard
from web.services.jobs import JobService
from web.tgi.routes import tgi_api


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format, "web")
    app = Flask(__name__, template_folder="pages/templates", static_folder="pages/static")
    client = connect(settings.redis_url, settings.redis_sentinel_master)
    # Every long poll holds a Redis connection (its pub/sub subscription), as does each job feed, and
    # redis-py's pool refuses more than 100 by default. Concurrency is bounded where it is configured
    # (BLOOMQ_MAX_WATCHERS, gunicorn's worker_connections), so the pool does not cap it a second time.
    client.connection_pool.max_connections = 2**31
    app.config["SECRET_KEY"] = settings.secret_key or shared_secret_key(client)
    app.json.sort_keys = False  # keep the resource's documented field order
    app.json.ensure_ascii = False  # prompts and outputs in any script stay readable
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["RATELIMIT_STORAGE_URI"], app.config["RATELIMIT_STORAGE_OPTIONS"] = limiter_storage(settings)
    app.config["RATELIMIT_SWALLOW_ERRORS"] = True  # a Redis outage is answered by the job store (503)

    service = JobService(
        settings=settings,
        registry=ModelRegistry(settings.model_refs),
        store=JobStore(client, settings.job_retention_seconds),
        directory=WorkerDirectory(client),
        celery=make_celery(settings),
        charge=charge,
        hold=hold_quota,
    )
    app.extensions["bloomq"] = service
    app.extensions["bloomq.watchers"] = WatcherSlots(client, settings.max_watchers_per_key, settings.max_watchers)
    app.extensions["bloomq.feeds"] = JobFeeds(service.store)
    app.extensions["bloomq.dashboard"] = Dashboard(service)

    app.extensions["bloomq.started"] = int(time.time())

    app.before_request(allow_batch_files)  # first: CSRF protection reads the form
    app.extensions["bloomq.key_book"] = book = KeyBook(client)
    init_auth(app, settings, book)
    limiter.init_app(app)
    app.extensions["bloomq.batches"] = BatchStore(client, settings.job_retention_seconds)
    for blueprint in (api, keys_api, usage_api, dashboard_api, openai_api, batches_api, tgi_api):
        csrf.exempt(blueprint)  # programs authenticate with Bearer keys; browser sessions are checked in auth
        app.register_blueprint(blueprint)
    app.register_blueprint(views)
    register_error_handlers(app)
    return app


def limiter_storage(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The rate limiter's storage URI and options: the same Redis (or Sentinel master) as the job store."""
    sentinel = settings.redis_sentinel
    if sentinel is None:
        return settings.redis_url, {}
    hosts = ",".join(f"{host}:{port}" for host, port in sentinel.sentinels)
    # Counts are read from the master too: a replica's lagging count would let a burst through.
    options = {"db": sentinel.db, "use_replicas": False, "socket_connect_timeout": 3, "socket_timeout": 10,
               "sentinel_kwargs": {"socket_connect_timeout": 0.5, "socket_timeout": 1, "username": None,
                                   "password": None}}
    if sentinel.password is not None:
        options.update(username=sentinel.username, password=sentinel.password)
    return f"redis+sentinel://{hosts}/{sentinel.master}", options


SECRET_KEY_NAME = "bloomq:web-secret-key"


def shared_secret_key(client: redis.Redis) -> str:
    """One random secret for every web process and machine (sessions and CSRF tokens must verify in
    any of them), made once and kept in Redis, unless BLOOMQ_SECRET_KEY sets one."""
    try:
        client.set(SECRET_KEY_NAME, secrets.token_hex(32), nx=True)
        value = client.get(SECRET_KEY_NAME)
    except redis.RedisError:
        value = None
    if value is None:  # Redis down at start-up: this process signs with its own key until restarted
        return secrets.token_hex(32)
    return value.decode()

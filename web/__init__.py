"""The bloomq web process: the REST API and the HTML form, over the shared job store.

    gunicorn --bind 127.0.0.1:5000 'web:create_app()'
"""

from __future__ import annotations

import secrets

from flask import Flask

from config.logs import configure_logging
from config.models import ModelRegistry
from config.settings import Settings
from jobs.celery_app import make_celery
from jobs.store import JobStore, connect
from jobs.workers import WorkerDirectory
from web.errors import register_error_handlers
from web.service import JobService


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format, "web")
    app = Flask(__name__)
    # Sessions are not used for auth here; a random key per process is fine when none is configured.
    app.config["SECRET_KEY"] = settings.secret_key or secrets.token_hex(32)
    app.json.sort_keys = False  # keep the resource's documented field order
    app.json.ensure_ascii = False  # prompts and outputs in any script stay readable
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    client = connect(settings.redis_url)
    service = JobService(
        settings=settings,
        registry=ModelRegistry(settings.model_refs),
        store=JobStore(client, settings.job_retention_seconds),
        directory=WorkerDirectory(client),
        celery=make_celery(settings),
    )
    app.extensions["bloomq"] = service

    from web.api import api
    from web.views import views

    app.register_blueprint(api)
    app.register_blueprint(views)
    register_error_handlers(app)
    return app

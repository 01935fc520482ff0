"""The bloomq web process: the REST API, the compatible APIs and the HTML pages, over the shared job store.

    gunicorn --bind 127.0.0.1:5000 'web:create_app()'

The folders name the surfaces (native, openai, tgi, pages, ops) over the services and the request plumbing
(http); nothing imports a route module except the app factory (web.app).
"""

from web.app import create_app, limiter_storage, shared_secret_key

__all__ = ["create_app", "limiter_storage", "shared_secret_key"]

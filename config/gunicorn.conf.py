"""gunicorn settings for the web process: ``gunicorn -c config/gunicorn.conf.py 'web:create_app()'``."""

import os

bind = f"{os.environ.get('BLOOMQ_HOST', '127.0.0.1')}:{os.environ.get('BLOOMQ_PORT', '5000')}"
# Requests are short (store + queue, or a read), so a few threaded workers go a long way.
workers = int(os.environ.get("BLOOMQ_WEB_WORKERS", "2"))
# A long poll (GET /api/v1/jobs/<id>?wait=N) holds a thread while it waits, hence more than a few.
threads = int(os.environ.get("BLOOMQ_WEB_THREADS", "8"))
worker_class = "gthread"
timeout = 60
accesslog = "-"

"""gunicorn settings for the web process: ``gunicorn -c config/gunicorn.conf.py 'web:create_app()'``."""

import os

bind = f"{os.environ.get('BLOOMQ_HOST', '127.0.0.1')}:{os.environ.get('BLOOMQ_PORT', '5000')}"
# Requests are short (store + queue, or a read), so a few threaded workers go a long way.
workers = int(os.environ.get("BLOOMQ_WEB_WORKERS", "2"))
threads = int(os.environ.get("BLOOMQ_WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 60
accesslog = "-"

# Two images from one file: `web` (Flask + Celery client, no torch) and `worker` (adds torch/transformers).
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY jobs ./jobs
COPY web ./web
COPY worker ./worker

FROM base AS web
RUN pip install .
EXPOSE 5000
CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "web:create_app()"]

FROM base AS flower
RUN pip install '.[monitor]'
EXPOSE 5555

FROM base AS worker
RUN pip install '.[worker]'
CMD ["python", "-m", "worker"]

"""Logging for web and worker: JSON lines (default) or plain text, each record carrying the job id it
concerns, so one job can be followed across the web and the worker that ran it."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator

from pythonjsonlogger.json import JsonFormatter

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("bloomq_job", default=None)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = current_job.get()
        return True


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log records made inside carry ``job_id``."""
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


def configure_logging(level: str, fmt: str, process: str) -> None:
    """Root logging to stderr; ``fmt`` is ``json`` or ``text``; ``process`` names the component."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s %(job_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"component": process},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{process} %(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)

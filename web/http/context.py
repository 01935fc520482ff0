"""What every surface's request handlers share: the app's job service, and the header naming the jobs a
compatible request made."""

from __future__ import annotations

import importlib.metadata

from flask import current_app

from web.services.jobs import JobService

JOB_ID_HEADER = "X-Bloomq-Job-Id"  # on OpenAI- and TGI-compatible answers: the bloomq job(s) behind them


def current_service() -> JobService:
    """The job service of the app handling this request."""
    return current_app.extensions["bloomq"]


def version() -> str:
    """This package's version ("0" when it is not installed)."""
    try:
        return importlib.metadata.version("bloomq")
    except importlib.metadata.PackageNotFoundError:
        return "0"

"""The HTML pages: a form to submit a prompt and a page that follows one job."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, redirect, render_template, request, session, url_for
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from jobs.schema import JobRequest
from jobs.usage import ANONYMOUS, daily_tokens, read_usage
from web.http.auth import api_keys, authenticate_page, current_caller, current_owner, is_operator, sign_in
from web.http.context import current_service
from web.http.errors import ApiError, field_errors
from web.http.limits import limiter
from web.pages.charts import stacked_bars
from web.services.batches import BatchFileError, accept_upload, own_batch, start_batch, your_batches

views = Blueprint("views", __name__)
views.before_request(authenticate_page)

STORY_TEMPLATE = "This is a creative story about {title}.\n"

# Form field -> how to read it. Empty fields are left out, so the API's defaults apply.
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty")


def story_prompt(title: str) -> str:
    """The "Creative story" preset."""
    return STORY_TEMPLATE.format(title=title.strip())


def form_to_request(form: MultiDict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The form as a JobRequest body, plus errors for fields that are not even numbers."""
    errors: dict[str, str] = {}
    if form.get("preset") == "story":
        title = form.get("title", "").strip()
        inputs = story_prompt(title) if title else ""
        if not title:
            errors["title"] = "give the story a title"
    else:
        inputs = form.get("inputs", "")
    params: dict[str, Any] = {}
    for name in _INT_FIELDS + _FLOAT_FIELDS:
        raw = form.get(name, "").strip()
        if not raw:
            continue
        try:
            params[name] = int(raw) if name in _INT_FIELDS else float(raw)
        except ValueError:
            errors[f"parameters.{name}"] = "must be a whole number" if name in _INT_FIELDS else "must be a number"
    if form.get("do_sample"):
        params["do_sample"] = True
    stops = [line for line in form.get("stop", "").splitlines() if line]
    if stops:
        params["stop"] = stops
    body: dict[str, Any] = {"inputs": inputs, "parameters": params}
    if form.get("model"):
        body["model"] = form["model"]
    return body, errors


@views.get("/")
def index() -> str:
    """The submission form."""
    return render_template("index.html", models=current_service().models(), form={}, errors={})


@views.post("/")
def submit_form() -> Response | tuple[str, int]:
    """Submit the form; redirect to the job page, or show the form again with messages."""
    body, errors = form_to_request(request.form)
    if not errors:
        try:
            job, _created = current_service().submit(JobRequest.model_validate(body), owner=current_owner())
            return redirect(url_for("views.job_page", job_id=job.id), code=303)
        except ValidationError as exc:
            errors = {f["name"]: f["message"] for f in field_errors(exc)}
        except ApiError as exc:
            if not exc.fields:
                raise
            errors = {f["name"]: f["message"] for f in exc.fields}
    return (
        render_template("index.html", models=current_service().models(), form=request.form, errors=errors),
        422,
    )


@views.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    """One job: status, then text, refreshed in place."""
    job = current_service().get(job_id, current_owner())
    if not is_operator():  # where it ran names a host: operators only
        job = job.model_copy(update={"worker": None, "worker_instance": None})
    return render_template(
        "job.html",
        job=job,
        api_url=url_for("api.get_job", job_id=job.id),
        events_url=url_for("api.job_events", job_id=job.id),
        cancel_url=url_for("api.cancel_job", job_id=job.id),
    )


@views.get("/batches")
def batches_page() -> str:
    """Upload a batch (JSONL, or one prompt per line with the form's parameters) and follow your batches."""
    return render_template("batches.html", models=current_service().models(), batches=_your_batches(), errors={}, form={})


@views.post("/batches")
def submit_batch() -> Response | tuple[str, int]:
    """Start a batch from the uploaded file (the same limits and checks as the Batch API); redirect to its
    page, or show the form again with messages."""

    settings = current_service().settings
    upload = request.files.get("file")
    content = upload.read(settings.max_batch_file_bytes + 1) if upload is not None else b""
    errors: dict[str, str] = {}
    if not content.strip():
        errors["file"] = "choose a file with at least one line"
    elif request.form.get("kind") == "prompts":
        body, errors = form_to_request(MultiDict({**request.form.to_dict(), "inputs": "x"}))
        if not errors:
            content = _prompts_as_jsonl(content, body)
    if not errors:
        try:
            meta = accept_upload(content, upload.filename or "batch.jsonl")
            batch = start_batch(meta.id, "24h", None)
            return redirect(url_for("views.batch_page", batch_id=batch.id), code=303)
        except BatchFileError as exc:
            errors["file"] = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in exc.errors[:20])
        except ApiError as exc:
            if exc.status == 429:
                raise
            errors["file"] = exc.message
    return render_template("batches.html", models=current_service().models(), batches=_your_batches(), errors=errors,
                           form=request.form), 422


@views.get("/batches/<batch_id>")
def batch_page(batch_id: str) -> str:
    """One batch: progress (the page refreshes itself while it runs), errors, and its result files."""

    return render_template("batch.html", batch=own_batch(batch_id))


def _your_batches() -> list[Any]:

    return your_batches(20)[0]


def _prompts_as_jsonl(content: bytes, body: dict[str, Any]) -> bytes:
    """A plain text file, one prompt per line, as batch requests with the form's parameters."""
    params = body["parameters"]
    request_body: dict[str, Any] = {"model": body.get("model") or current_service().registry.default.name,
                                    "max_tokens": params.get("max_new_tokens", 64)}
    request_body["temperature"] = params.get("temperature", 0)
    for name in ("top_k", "top_p", "repetition_penalty", "seed"):
        if name in params:
            request_body[name] = params[name]
    lines = []
    for number, prompt in enumerate(content.decode(errors="replace").splitlines(), start=1):
        if prompt.strip():
            lines.append(json.dumps({"custom_id": f"line-{number}", "method": "POST", "url": "/v1/completions",
                                     "body": {**request_body, "prompt": prompt}}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


@views.get("/dashboard")
def dashboard_page() -> str | tuple[str, int]:
    """The fleet, live (operators): it polls /api/v1/dashboard."""
    if not is_operator():
        return render_template("error.html", code=403, message="the dashboard is for operator keys"), 403
    return render_template("dashboard.html", figures=current_app.extensions["bloomq.dashboard"].figures(),
                           figures_url=url_for("dashboard.dashboard_figures"))


USAGE_DAYS = 30


@views.get("/usage")
def usage_page() -> str:
    """Your tokens of the last 30 UTC days, per model per day, and where your key's quotas stand."""
    owner = current_owner() or ANONYMOUS
    end = datetime.now(UTC).date()
    start = end - timedelta(days=USAGE_DAYS - 1)
    days = [(start + timedelta(days=i)).isoformat() for i in range(USAGE_DAYS)]
    redis_client = current_service().store.redis
    chart = stacked_bars(days, daily_tokens(redis_client, start, end, owner))
    models = read_usage(redis_client, start, end, owner, "model")
    caller = current_caller()
    quota = None
    if caller is not None and caller.key is not None:
        quota = {"key": caller.key, **current_service().quotas.in_use(caller.owner)}
    return render_template("usage.html", chart=chart, models=models, quota=quota, start=days[0], end=days[-1])


LOGIN_ATTEMPTS = "10/minute"  # sign-in attempts per client address: no guessing keys through the form


@views.route("/login", methods=["GET", "POST"])
@limiter.limit(LOGIN_ATTEMPTS, key_func=lambda: request.remote_addr or "unknown", methods=["POST"])
def login() -> Response | str | tuple[str, int]:
    """Sign in with an API key (only when keys are on); the session then acts for that key, which is
    checked again on every request (a revoked key ends it)."""
    keys = api_keys()
    if keys is None:
        return redirect(url_for("views.index"))
    if request.method == "POST":
        caller = keys.identify(request.form.get("api_key", "").strip())
        if caller is not None:
            sign_in(caller)
            return redirect(_local_path(request.args.get("next", "")) or url_for("views.index"))
        return render_template("login.html", error="that is not a valid API key"), 401
    return render_template("login.html", error=None)


@views.post("/logout")
def logout() -> Response:
    """Forget the session's key."""
    session.clear()
    return redirect(url_for("views.login"))


def _local_path(target: str) -> str | None:
    """``target`` if it is a plain path on this site (never an open redirect), else None."""
    if not target.startswith("/") or any(ord(ch) < 32 or ch == "\\" for ch in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return None
    return target

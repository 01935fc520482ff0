"""Batches of OpenAI completion requests: keeping an uploaded file within its limits, validating a file whole
and turning it into a batch of jobs, and a batch's progress (its final status written once). The OpenAI
routes (``web.openai.batches``) and the batch pages (``web.pages.views``) both use it."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from flask import current_app
from pydantic import ValidationError

from jobs.batches import (
    MAX_CUSTOM_ID,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    BatchError,
    BatchLine,
    BatchObject,
    BatchStore,
    FileObject,
    RequestCounts,
)
from jobs.intake import BatchIntake
from jobs.schema import Job
from web.http.auth import current_owner
from web.http.context import current_service
from web.http.errors import ApiError, field_errors
from web.http.limits import file_bytes_limit
from web.openai.schema import CompletionRequest, check_completion, completion_jobs, job_requests, renamed
from web.services.jobs import BatchOrigin

log = logging.getLogger(__name__)

ENDPOINT = "/v1/completions"
WINDOWS = {"24h": 24 * 3600}
MAX_ERRORS_LISTED = 1000  # bad lines named in one refusal (a file of 10,000 bad lines names the first ones)


class BatchFileError(ApiError):
    """A batch file with bad lines: refused whole, every bad line named."""

    def __init__(self, errors: list[BatchError]) -> None:
        first = errors[0]
        where = f"line {first.line}: " if first.line else ""
        # OpenAI's list of line errors rides in the error object (``error.errors``).
        listed = {"object": "list", "data": [e.model_dump() for e in errors[:MAX_ERRORS_LISTED]], "total": len(errors)}
        super().__init__(400, "invalid_batch_file", f"the input file has {len(errors)} invalid line(s); nothing was "
                         f"queued (first: {where}{first.message})", [{"name": "input_file_id", "message": "invalid lines"}],
                         extra={"errors": listed})
        self.errors = errors



def batch_store() -> BatchStore:
    return current_app.extensions["bloomq.batches"]


def batch_intake() -> BatchIntake:
    svc = current_service()
    return BatchIntake(svc.store, batch_store(), svc.batch_queue)


def invalid(param: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request_error", message, [{"name": param, "message": message}])


def request_lines(content: bytes) -> list[tuple[int, bytes]]:
    """The lines of a batch file that hold a request, with their line numbers: every line break Python
    knows ends a line (``\n``, ``\r\n``, a lone ``\r``...), and blank lines are skipped. Uploads are
    counted, and files read, by this one rule."""
    return [(number, raw) for number, raw in enumerate(content.splitlines(), start=1) if raw.strip()]



def accept_upload(content: bytes, filename: str) -> FileObject:
    """Keep an uploaded batch file, within the limits every upload meets (the API's and the form's):
    its size, its lines (counted as they will be read), the rate limit (an upload counts as one) and what
    the key's kept files may hold in all."""
    settings = current_service().settings
    if len(content) > settings.max_batch_file_bytes:
        raise ApiError(413, "invalid_request_error", f"the file is over {settings.max_batch_file_bytes} bytes",
                       [{"name": "file", "message": "too large"}])
    lines = len(request_lines(content))
    if lines > settings.max_batch_lines:
        raise invalid("file", f"the file has {lines} lines; at most {settings.max_batch_lines} are accepted")
    current_service().charge(1)
    limit = file_bytes_limit()
    meta = batch_store().add_file(content, filename, "batch", current_owner(), limit)
    if meta is None:
        used = batch_store().stored_bytes(current_owner())
        raise ApiError(413, "storage_limit_reached",
                       f"this key's files already hold {used} bytes; with this one they would pass the limit of "
                       f"{limit} (the key's file_bytes, or BLOOMQ_MAX_FILE_BYTES_PER_KEY): delete files you no "
                       "longer need (DELETE /v1/files/<id>) or wait for them to expire",
                       [{"name": "file", "message": "over this key's storage limit"}])
    return meta



def check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise invalid("metadata", "a map of strings to strings")
    if len(metadata) > MAX_METADATA_PAIRS or any(
            len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in metadata.items()):
        raise invalid("metadata", f"at most {MAX_METADATA_PAIRS} pairs, keys up to {MAX_METADATA_KEY} characters, "
                       f"values up to {MAX_METADATA_VALUE}")


def start_batch(file_id: str, window: str, metadata: dict[str, str] | None) -> BatchObject:
    """Make a batch of the caller's file: validated whole (a BatchFileError naming every bad line, and
    nothing written), then stored with all its jobs and queued."""
    now = int(time.time())
    batch = BatchObject(id=f"batch_{secrets.token_hex(12)}", endpoint=ENDPOINT, input_file_id=file_id,
                        completion_window=window, created_at=now, expires_at=now + WINDOWS[window],
                        metadata=metadata, owner=current_owner(), status="in_progress", in_progress_at=now)
    deadline = datetime.fromtimestamp(batch.expires_at, UTC)
    lines, jobs, errors = _read(batch_store().file_content(file_id) or b"", BatchOrigin(batch.id, deadline))
    if errors:
        raise BatchFileError(errors)
    svc = current_service()
    svc.charge(len(jobs))
    jobs = svc.hold(jobs)  # every line's budget, or a 429 and nothing held: a batch over the quota is refused whole
    batch = batch.model_copy(update={"request_counts": RequestCounts(total=len(jobs))})
    intake = batch_intake()
    try:
        intake.begin(batch, lines, jobs)
    except redis.RedisError:
        svc.release_holds(jobs)
        raise
    try:
        intake.run(batch.id)
    except redis.RedisError as exc:  # the batch is stored: a worker's recovery loop finishes queuing it
        log.warning("batch %s: queuing stopped (%s); it is finished by the workers", batch.id, exc)
    return batch


def _read(content: bytes, line_of: BatchOrigin) -> tuple[list[BatchLine], list[Job], list[BatchError]]:
    """Every line's jobs, checked as the job API checks a job; or every error found (each with its line)."""
    lines: list[BatchLine] = []
    jobs: list[Job] = []
    errors: list[BatchError] = []
    svc = current_service()
    for number, custom_id, req in _parse(content, errors):
        try:
            spec = svc.spec_for(req.model)
            if spec is None:
                raise invalid("model", f"unknown model {req.model!r}")
            requests = job_requests(spec.name, completion_jobs(req), req.max_tokens is None, spec.max_total_tokens)
            try:
                made = [svc.prepare(job_request, current_owner(), line_of) for job_request in requests]
            except ApiError as err:
                raise renamed(err) from None
        except ApiError as err:
            param = err.fields[0]["name"] if err.fields else None
            errors.append(BatchError(code="invalid_request", line=number, param=param and f"body.{param}",
                                     message=err.message))
            continue
        lines.append(BatchLine(custom_id=custom_id, job_ids=[job.id for job in made],
                               request=req.model_dump(exclude_unset=True)))
        jobs.extend(made)
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", message="the input file has no requests"))
    return lines, jobs, errors


def _parse(content: bytes, errors: list[BatchError]) -> Iterator[tuple[int, str, CompletionRequest]]:
    """Every well-formed line's number, custom id and request; the errors of the others go to ``errors``."""
    seen: set[str] = set()
    for number, raw in request_lines(content):
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            errors.append(BatchError(code="invalid_json_line", line=number, message=f"not valid JSON: {exc}"))
            continue
        if not isinstance(line, dict):
            errors.append(BatchError(code="invalid_json_line", line=number, message="a line must be a JSON object"))
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(BatchError(code="missing_required_parameter", line=number, param="custom_id",
                                     message="custom_id (a string) is required"))
        elif len(custom_id) > MAX_CUSTOM_ID:
            errors.append(BatchError(code="invalid_request", line=number, param="custom_id",
                                     message=f"custom_id is over {MAX_CUSTOM_ID} characters"))
        elif custom_id in seen:
            errors.append(BatchError(code="duplicate_custom_id", line=number, param="custom_id",
                                     message=f"custom_id {custom_id!r} appears more than once"))
        if isinstance(custom_id, str):
            seen.add(custom_id)
        if line.get("method") != "POST":
            errors.append(BatchError(code="invalid_method", line=number, param="method", message="method must be POST"))
        if line.get("url") != ENDPOINT:
            errors.append(BatchError(code="invalid_url", line=number, param="url", message=f"url must be {ENDPOINT}"))
            continue
        try:
            req = CompletionRequest.model_validate(line.get("body"))
            check_completion(req)
            if req.stream:
                raise invalid("stream", "a batch line cannot stream")
        except ValidationError as exc:
            field = field_errors(exc)[0]
            errors.append(BatchError(code="invalid_request", line=number, param=f"body.{field['name']}",
                                     message=field["message"]))
            continue
        except ApiError as err:
            param = err.fields[0]["name"] if err.fields else None
            errors.append(BatchError(code="invalid_request", line=number, param=param and f"body.{param}",
                                     message=err.message))
            continue
        if errors and errors[-1].line == number:
            continue
        yield number, custom_id, req



def own_batch(batch_id: str) -> BatchObject:
    """The caller's batch, brought up to date (a 404 for an unknown one or another key's)."""
    found = batch_store().batch(batch_id)
    if found is None or (current_owner() is not None and found[0].owner != current_owner()):
        raise ApiError(404, "not_found", f"No such batch: {batch_id}", [{"name": "batch_id", "message": "unknown"}])
    return batch_progress(*found)


def your_batches(limit: int, after: str | None = None) -> tuple[list[BatchObject], bool]:
    """A page of the caller's batches, newest first, brought up to date; whether more follow."""
    found, more = batch_store().batches(current_owner(), after, limit)
    return [batch_progress(batch, counts) for batch, counts in found], more


def batch_progress(batch: BatchObject, counts: dict[str, int]) -> BatchObject:
    """Counters from the job store; once every line has ended, the batch's final status (written once: a
    compare-and-set, so a cancel at the same moment is never overwritten)."""
    if batch.status not in ("in_progress", "cancelling"):
        return batch
    total = batch.request_counts.total
    counted = RequestCounts(total=total, completed=counts["completed"], failed=counts["failed"])
    if counts["completed"] + counts["failed"] < total:
        return batch.model_copy(update={"request_counts": counted})

    def finish(current: BatchObject) -> BatchObject | None:
        if current.status not in ("in_progress", "cancelling"):
            return None
        now = int(time.time())
        update: dict[str, Any] = {"request_counts": counted, "finalizing_at": now,
                                  "output_file_id": current.output_id if counts["completed"] else None,
                                  "error_file_id": current.errors_id if counts["failed"] else None}
        if current.status == "cancelling":
            update.update(status="cancelled", cancelled_at=now)
        elif counts["expired"]:
            update.update(status="expired", expired_at=now)
        else:
            update.update(status="completed", completed_at=now)
        return current.model_copy(update=update)

    finished = batch_store().update(batch.id, finish)
    if finished is not None:
        return finished
    found = batch_store().batch(batch.id)  # someone else ended it first: theirs stands
    return found[0] if found is not None else batch



"""The OpenAI Batch API over the job queue: ``/v1/files`` and ``/v1/batches``.

Every line of a batch file becomes jobs of the **batch** priority class (workers take interactive jobs
first), owned by the same key, deadline at the end of the completion window, so lines are batched with
everything else and survive worker crashes and Redis restarts like any job. A file is validated whole,
with the checks its jobs will meet, before anything is queued: a file with a bad line is refused (400,
every bad line named) and leaves nothing behind. An accepted batch is queued by ``jobs.intake`` (chunk by
chunk, resumable by the workers if this process dies). Results are read from the job records when the
output file is downloaded (nothing is copied).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from pydantic import ValidationError

from jobs.batches import (
    ERRORS_SUFFIX,
    MAX_CUSTOM_ID,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    OUTPUT_SUFFIX,
    TERMINAL_BATCH,
    BatchError,
    BatchLine,
    BatchObject,
    BatchStore,
    FileObject,
    RequestCounts,
)
from jobs.intake import BatchIntake
from jobs.schema import Job, JobStatus
from web.auth import authenticate_api, current_owner
from web.context import current_service
from web.errors import ApiError, field_errors
from web.openai_api import Completion, completion_choices, job_requests, openai_error, renamed
from web.openai_schema import CompletionRequest, check_completion, completion_jobs
from web.service import BatchLine as JobBatchLine

log = logging.getLogger(__name__)

ENDPOINT = "/v1/completions"
WINDOWS = {"24h": 24 * 3600}
MAX_ERRORS_LISTED = 1000  # bad lines named in one refusal (a file of 10,000 bad lines names the first ones)

batches_api = Blueprint("batches_api", __name__, url_prefix="/v1")
batches_api.before_request(authenticate_api)


class BatchFileError(ApiError):
    """A batch file with bad lines: refused whole, every bad line named."""

    def __init__(self, errors: list[BatchError]) -> None:
        first = errors[0]
        where = f"line {first.line}: " if first.line else ""
        super().__init__(400, "invalid_batch_file", f"the input file has {len(errors)} invalid line(s); nothing was "
                         f"queued (first: {where}{first.message})", [{"name": "input_file_id", "message": "invalid lines"}])
        self.errors = errors


@batches_api.errorhandler(ApiError)
def _error(err: ApiError) -> Response:
    """OpenAI's error shape; a refused batch file adds ``error.errors`` (OpenAI's list of line errors)."""
    response = openai_error(err)
    if isinstance(err, BatchFileError):
        body = response.get_json()
        listed = err.errors[:MAX_ERRORS_LISTED]
        body["error"]["errors"] = {"object": "list", "data": [e.model_dump() for e in listed],
                                   "total": len(err.errors)}
        response.set_data(json.dumps(body, ensure_ascii=False))
    return response


def _store() -> BatchStore:
    return current_app.extensions["bloomq.batches"]


def _intake() -> BatchIntake:
    svc = current_service()
    return BatchIntake(svc.store, _store(), svc.batch_queue)


def _invalid(param: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request_error", message, [{"name": param, "message": message}])


def request_lines(content: bytes) -> list[tuple[int, bytes]]:
    """The lines of a batch file that hold a request, with their line numbers: every line break Python
    knows ends a line (``\n``, ``\r\n``, a lone ``\r``...), and blank lines are skipped. Uploads are
    counted, and files read, by this one rule."""
    return [(number, raw) for number, raw in enumerate(content.splitlines(), start=1) if raw.strip()]


def _page_limit() -> int:
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise _invalid("limit", "an integer from 1 to 100")
    return limit


# -- files ---------------------------------------------------------------------------------------


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
        raise _invalid("file", f"the file has {lines} lines; at most {settings.max_batch_lines} are accepted")
    current_service().charge(1)
    meta = _store().add_file(content, filename, "batch", current_owner(), settings.max_file_bytes_per_key)
    if meta is None:
        used = _store().stored_bytes(current_owner())
        raise ApiError(413, "storage_limit_reached",
                       f"this key's files already hold {used} bytes; with this one they would pass the limit of "
                       f"{settings.max_file_bytes_per_key} (BLOOMQ_MAX_FILE_BYTES_PER_KEY): delete files you no "
                       "longer need (DELETE /v1/files/<id>) or wait for them to expire",
                       [{"name": "file", "message": "over this key's storage limit"}])
    return meta


@batches_api.post("/files")
def upload_file() -> Response:
    """Multipart ``file`` + ``purpose=batch``."""
    settings = current_service().settings
    request.max_content_length = settings.max_batch_file_bytes + 64 * 1024  # the form's own fields
    upload = request.files.get("file")
    purpose = request.form.get("purpose")
    if upload is None:
        raise _invalid("file", "send the file as multipart form data in the field 'file'")
    if purpose != "batch":
        raise _invalid("purpose", "only purpose=batch is supported")
    content = upload.read(settings.max_batch_file_bytes + 1)
    meta = accept_upload(content, upload.filename or "batch.jsonl")
    return jsonify(meta.model_dump())


@batches_api.get("/files")
def list_files() -> Response:
    """The caller's uploaded files (OpenAI's list): ``purpose``, ``limit`` (1-100), ``after`` (a file id),
    ``order`` (``desc``, the default: newest first; or ``asc``)."""
    limit = _page_limit()
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _invalid("order", "asc or desc")
    purpose = request.args.get("purpose")
    files, more = _store().files(current_owner(), request.args.get("after"), limit, newest_first=order == "desc")
    if purpose is not None and purpose != "batch":
        files, more = [], False  # every uploaded file is a batch input
    data = [meta.model_dump() for meta in files]
    return jsonify({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more})


def _own_file(file_id: str, param: str = "file_id"):  # noqa: ANN202 - a FileObject
    """The caller's uploaded file (and None), or (None and) the batch whose result file ``file_id`` is; a
    404 naming ``param`` (the field that carried the id) for any other id."""
    unknown = ApiError(404, "not_found", f"No such file: {file_id}", [{"name": param, "message": "unknown"}])
    if file_id.endswith((OUTPUT_SUFFIX, ERRORS_SUFFIX)):
        try:
            batch = own_batch(file_id.removeprefix("file-").removesuffix(OUTPUT_SUFFIX).removesuffix(ERRORS_SUFFIX))
        except ApiError:
            raise unknown from None
        return None, batch
    meta = _store().file(file_id)
    if meta is None or (current_owner() is not None and meta.owner != current_owner()):
        raise unknown
    return meta, None


@batches_api.get("/files/<file_id>")
def get_file(file_id: str) -> Response:
    meta, batch = _own_file(file_id)
    if meta is not None:
        return jsonify(meta.model_dump())
    size = sum(len(line) for line in _result_lines(batch, errors=file_id.endswith(ERRORS_SUFFIX)))
    return jsonify({"id": file_id, "object": "file", "bytes": size, "created_at": batch.completed_at or batch.created_at,
                    "filename": f"{batch.id}{'_errors' if file_id.endswith(ERRORS_SUFFIX) else '_output'}.jsonl",
                    "purpose": "batch_output", "status": "processed", "expires_at": None})


@batches_api.get("/files/<file_id>/content")
def file_content(file_id: str) -> Response:
    meta, batch = _own_file(file_id)
    if meta is not None:
        return Response(_store().file_content(file_id) or b"", mimetype="application/jsonl")
    errors = file_id.endswith(ERRORS_SUFFIX)
    return Response(stream_with_context(_result_lines(batch, errors)), mimetype="application/jsonl")


@batches_api.delete("/files/<file_id>")
def delete_file(file_id: str) -> Response:
    meta, batch = _own_file(file_id)
    if meta is None:
        raise _invalid("file_id", "a batch's result file goes when its batch does")
    _store().delete_file(file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


# -- batches -------------------------------------------------------------------------------------


@batches_api.post("/batches")
def create_batch() -> Response:
    """Validate the input file whole, then queue every line as jobs; a file with any bad line is refused
    (400, every error by line) and nothing is queued."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # Python's JSON reader recurses once per nesting level
        raise _invalid("body", "the body is nested too deeply to be a batch request") from None
    if not isinstance(body, dict):
        raise _invalid("body", "send a JSON object")
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
    metadata = body.get("metadata")
    if endpoint != ENDPOINT:
        raise _invalid("endpoint", f"only {ENDPOINT} is supported")
    if window not in WINDOWS:
        raise _invalid("completion_window", f"one of {', '.join(WINDOWS)}")
    _check_metadata(metadata)
    if not isinstance(file_id, str):
        raise _invalid("input_file_id", "required")
    meta, _ = _own_file(file_id, "input_file_id")
    if meta is None:
        raise _invalid("input_file_id", "a batch's result file cannot be a batch's input")
    return jsonify(_public(start_batch(file_id, window, metadata)))


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _invalid("metadata", "a map of strings to strings")
    if len(metadata) > MAX_METADATA_PAIRS or any(
            len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in metadata.items()):
        raise _invalid("metadata", f"at most {MAX_METADATA_PAIRS} pairs, keys up to {MAX_METADATA_KEY} characters, "
                       f"values up to {MAX_METADATA_VALUE}")


def start_batch(file_id: str, window: str, metadata: dict[str, str] | None) -> BatchObject:
    """Make a batch of the caller's file: validated whole (a BatchFileError naming every bad line, and
    nothing written), then stored with all its jobs and queued."""
    now = int(time.time())
    batch = BatchObject(id=f"batch_{secrets.token_hex(12)}", endpoint=ENDPOINT, input_file_id=file_id,
                        completion_window=window, created_at=now, expires_at=now + WINDOWS[window],
                        metadata=metadata, owner=current_owner(), status="in_progress", in_progress_at=now)
    deadline = datetime.fromtimestamp(batch.expires_at, UTC)
    lines, jobs, errors = _read(_store().file_content(file_id) or b"", JobBatchLine(batch.id, deadline))
    if errors:
        raise BatchFileError(errors)
    current_service().charge(len(jobs))
    batch = batch.model_copy(update={"request_counts": RequestCounts(total=len(jobs))})
    intake = _intake()
    intake.begin(batch, lines, jobs)
    try:
        intake.run(batch.id)
    except redis.RedisError as exc:  # the batch is stored: a worker's recovery loop finishes queuing it
        log.warning("batch %s: queuing stopped (%s); it is finished by the workers", batch.id, exc)
    return batch


def _read(content: bytes, line_of: JobBatchLine) -> tuple[list[BatchLine], list[Job], list[BatchError]]:
    """Every line's jobs, checked as the job API checks a job; or every error found (each with its line)."""
    lines: list[BatchLine] = []
    jobs: list[Job] = []
    errors: list[BatchError] = []
    svc = current_service()
    for number, custom_id, req in _parse(content, errors):
        try:
            spec = svc.spec_for(req.model)
            if spec is None:
                raise _invalid("model", f"unknown model {req.model!r}")
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
                raise _invalid("stream", "a batch line cannot stream")
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
    found = _store().batch(batch_id)
    if found is None or (current_owner() is not None and found[0].owner != current_owner()):
        raise ApiError(404, "not_found", f"No such batch: {batch_id}", [{"name": "batch_id", "message": "unknown"}])
    return _progress(*found)


def your_batches(limit: int, after: str | None = None) -> tuple[list[BatchObject], bool]:
    """A page of the caller's batches, newest first, brought up to date; whether more follow."""
    found, more = _store().batches(current_owner(), after, limit)
    return [_progress(batch, counts) for batch, counts in found], more


def _progress(batch: BatchObject, counts: dict[str, int]) -> BatchObject:
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

    finished = _store().update(batch.id, finish)
    if finished is not None:
        return finished
    found = _store().batch(batch.id)  # someone else ended it first: theirs stands
    return found[0] if found is not None else batch


def _public(batch: BatchObject) -> dict[str, Any]:
    return batch.model_dump(mode="json")


@batches_api.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return jsonify(_public(own_batch(batch_id)))


@batches_api.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    """Queued lines never run (nor do lines not yet queued); running ones stop within a step; the batch
    ends ``cancelled``. The cancel is a compare-and-set on the batch: nothing started later overwrites it."""
    own_batch(batch_id)
    intake = _intake()

    def cancelling(current: BatchObject) -> BatchObject | None:
        if current.status in TERMINAL_BATCH or current.status == "cancelling":
            return None
        return current.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time())})

    if _store().update(batch_id, cancelling, also=lambda pipe: intake.stage_cancel(pipe, batch_id)) is not None:
        svc = current_service()
        for line in _store().lines(batch_id):  # every job queued before the cancel (no more are queued after it)
            for job_id in line.job_ids:
                svc.store.cancel(job_id)
        intake.run(batch_id)  # counts the jobs never queued as failed lines, so the batch can end
    found = _store().batch(batch_id)
    assert found is not None
    return jsonify(_public(_progress(*found)))


@batches_api.get("/batches")
def list_batches() -> Response:
    """The caller's batches, newest first; ``after`` (a batch id) and ``limit`` (1-100) page through them.
    Batches past their retention are left out."""
    page, more = your_batches(_page_limit(), request.args.get("after"))
    data = [_public(batch) for batch in page]
    return jsonify({"object": "list", "data": data, "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None, "has_more": more})


# -- results -------------------------------------------------------------------------------------


def _result_lines(batch: BatchObject, errors: bool) -> Iterator[bytes]:
    """The output (or error) file: one JSON line per request, from the job records."""
    store = current_service().store
    cancelled = batch.status in ("cancelling", "cancelled")
    for chunk in _store().line_chunks(batch.id):
        # The chunk's job records in one round trip, not one per job.
        found = iter(store.get_many([job_id for line in chunk for job_id in line.job_ids]))
        yield from _result_chunk(chunk, [[next(found) for _ in line.job_ids] for line in chunk], errors, cancelled)


def _result_chunk(chunk: list[BatchLine], chunk_jobs: list[list[Job | None]], errors: bool, cancelled: bool
                  ) -> Iterator[bytes]:
    for line, jobs in zip(chunk, chunk_jobs, strict=True):
        bad = [i for i, job in enumerate(jobs) if job is None or job.status is not JobStatus.SUCCEEDED]
        if not bad and not errors:
            req = CompletionRequest.model_validate(line.request)
            completion = Completion(f"cmpl-{line.job_ids[0]}", jobs[0].model, "text_completion", len(req.prompts),
                                    req.n)
            body = completion.body(jobs, completion_choices(jobs, req))
            yield _jsonl({"id": f"batch_req_{line.job_ids[0]}", "custom_id": line.custom_id,
                          "response": {"status_code": 200, "request_id": line.job_ids[0], "body": body},
                          "error": None})
        elif bad and errors:
            yield _jsonl({"id": f"batch_req_{line.job_ids[0]}", "custom_id": line.custom_id, "response": None,
                          "error": _line_error(jobs[bad[0]], cancelled)})


def _line_error(job: Job | None, cancelled: bool) -> dict[str, str]:
    if job is None and cancelled:  # cancelled before the line was queued: it never existed as a job
        return {"code": "batch_cancelled", "message": "the batch was cancelled before this request was queued"}
    if job is None:
        return {"code": "not_found", "message": "the line's job is gone (past retention)"}
    if job.status is JobStatus.CANCELED:
        return {"code": "batch_cancelled", "message": "the batch was cancelled before this request finished"}
    if job.error is not None and job.error.type == "expired":
        return {"code": "batch_expired", "message": "the request did not run within the completion window"}
    if not job.status.terminal:
        return {"code": "in_progress", "message": "the request has not finished yet"}
    error = job.error
    return {"code": error.type if error else "failed", "message": error.message if error else job.status.value}


def _jsonl(item: dict[str, Any]) -> bytes:
    return json.dumps(item, ensure_ascii=False).encode() + b"\n"


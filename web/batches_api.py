"""The OpenAI Batch API over the job queue: ``/v1/files`` and ``/v1/batches``.

Every line of a batch file becomes jobs of the **batch** priority class (workers take interactive jobs
first), owned by the same key, deadline at the end of the completion window, so lines are batched with
everything else and survive worker crashes and Redis restarts like any job. Results are read from the
job records when the output file is downloaded (nothing is copied).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from pydantic import ValidationError

from jobs.batches import (
    ERRORS_SUFFIX,
    OUTPUT_SUFFIX,
    BatchError,
    BatchErrors,
    BatchLine,
    BatchObject,
    BatchStore,
    RequestCounts,
)
from jobs.schema import Job, JobStatus
from web.auth import authenticate_api, current_owner
from web.errors import ApiError, field_errors
from web.openai_api import Completion, completion_choices, openai_error, submit_jobs
from web.openai_schema import CompletionRequest, check_completion, completion_jobs
from web.service import BatchLine as JobBatchLine
from web.service import JobService

ENDPOINT = "/v1/completions"
WINDOWS = {"24h": 24 * 3600}

batches_api = Blueprint("batches_api", __name__, url_prefix="/v1")
batches_api.before_request(authenticate_api)
batches_api.register_error_handler(ApiError, openai_error)


def _service() -> JobService:
    return current_app.extensions["bloomq"]


def _store() -> BatchStore:
    return current_app.extensions["bloomq.batches"]


def _invalid(param: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request_error", message, [{"name": param, "message": message}])


# -- files ---------------------------------------------------------------------------------------


@batches_api.post("/files")
def upload_file() -> Response:
    """Multipart ``file`` + ``purpose=batch``."""
    settings = _service().settings
    request.max_content_length = settings.max_batch_file_bytes + 64 * 1024  # the form's own fields
    upload = request.files.get("file")
    purpose = request.form.get("purpose")
    if upload is None:
        raise _invalid("file", "send the file as multipart form data in the field 'file'")
    if purpose != "batch":
        raise _invalid("purpose", "only purpose=batch is supported")
    content = upload.read(settings.max_batch_file_bytes + 1)
    if len(content) > settings.max_batch_file_bytes:
        raise ApiError(413, "invalid_request_error", f"the file is over {settings.max_batch_file_bytes} bytes",
                       [{"name": "file", "message": "too large"}])
    lines = content.count(b"\n") + (0 if content.endswith(b"\n") or not content else 1)
    if lines > settings.max_batch_lines:
        raise _invalid("file", f"the file has {lines} lines; at most {settings.max_batch_lines} are accepted")
    meta = _store().add_file(content, upload.filename or "batch.jsonl", purpose, current_owner())
    return jsonify(meta.model_dump())


def _own_file(file_id: str):  # noqa: ANN202 - a FileObject
    if file_id.endswith((OUTPUT_SUFFIX, ERRORS_SUFFIX)):
        batch = own_batch(file_id.removeprefix("file-").removesuffix(OUTPUT_SUFFIX).removesuffix(ERRORS_SUFFIX))
        return None, batch
    meta = _store().file(file_id)
    if meta is None or (current_owner() is not None and meta.owner != current_owner()):
        raise ApiError(404, "not_found", f"No such file: {file_id}", [{"name": "file_id", "message": "unknown"}])
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
    """Validate the input file, then queue every line as a job; a file with any bad line fails the batch
    (with every error, by line) and runs nothing."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _invalid("body", "send a JSON object")
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
    metadata = body.get("metadata")
    if endpoint != ENDPOINT:
        raise _invalid("endpoint", f"only {ENDPOINT} is supported")
    if window not in WINDOWS:
        raise _invalid("completion_window", f"one of {', '.join(WINDOWS)}")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _invalid("metadata", "a map of strings to strings")
    if not isinstance(file_id, str):
        raise _invalid("input_file_id", "required")
    meta, _ = _own_file(file_id)
    if meta is None:
        raise _invalid("input_file_id", "a batch's result file cannot be a batch's input")
    return jsonify(_public(start_batch(file_id, window, metadata)))


def start_batch(file_id: str, window: str, metadata: dict[str, str] | None) -> BatchObject:
    """Make a batch of the caller's file: validated as a whole, then every line queued."""
    now = int(time.time())
    batch = BatchObject(id=f"batch_{secrets.token_hex(12)}", endpoint=ENDPOINT, input_file_id=file_id,
                        completion_window=window, created_at=now, expires_at=now + WINDOWS[window],
                        metadata=metadata, owner=current_owner())
    store = _store()
    store.add_batch(batch)
    parsed, errors = _parse(store.file_content(file_id) or b"")
    if errors:
        batch = batch.model_copy(update={"status": "failed", "failed_at": int(time.time()),
                                         "errors": BatchErrors(data=errors)})
        store.save(batch)
        return batch
    deadline = datetime.fromtimestamp(batch.expires_at, UTC)
    lines = []
    for custom_id, req in parsed:
        spec = _service().spec_for(req.model)
        assert spec is not None  # checked while parsing
        jobs = submit_jobs(spec.name, completion_jobs(req), req.max_tokens is None, spec.max_total_tokens,
                           batch=JobBatchLine(batch.id, deadline))
        lines.append(BatchLine(custom_id=custom_id, job_ids=[job.id for job in jobs],
                               request=req.model_dump(exclude_unset=True)))
    store.add_lines(batch.id, lines)
    total = sum(len(line.job_ids) for line in lines)
    batch = batch.model_copy(update={"status": "in_progress", "in_progress_at": int(time.time()),
                                     "request_counts": RequestCounts(total=total)})
    store.save(batch)
    return batch


def _parse(content: bytes) -> tuple[list[tuple[str, CompletionRequest]], list[BatchError]]:
    """Every line's custom id and request, or every error found (each with its line number)."""
    parsed, errors, seen = [], [], set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
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
        elif custom_id in seen:
            errors.append(BatchError(code="duplicate_custom_id", line=number, param="custom_id",
                                     message=f"custom_id {custom_id!r} appears more than once"))
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
            if _service().spec_for(req.model) is None:
                raise _invalid("model", f"unknown model {req.model!r}")
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
        parsed.append((custom_id, req))
    if not parsed and not errors:
        errors.append(BatchError(code="empty_file", message="the input file has no requests"))
    return parsed, errors


def own_batch(batch_id: str) -> BatchObject:
    """The caller's batch, brought up to date (a 404 for an unknown one or another key's)."""
    found = _store().batch(batch_id)
    if found is None or (current_owner() is not None and found[0].owner != current_owner()):
        raise ApiError(404, "not_found", f"No such batch: {batch_id}", [{"name": "batch_id", "message": "unknown"}])
    batch, counts = found
    return _progress(batch, counts)


def _progress(batch: BatchObject, counts: dict[str, int]) -> BatchObject:
    """Counters from the job store; once every line has ended, the batch's final status."""
    if batch.status not in ("in_progress", "cancelling"):
        return batch
    total = batch.request_counts.total
    update: dict[str, Any] = {"request_counts": RequestCounts(total=total, completed=counts["completed"],
                                                              failed=counts["failed"])}
    if counts["completed"] + counts["failed"] >= total:
        now = int(time.time())
        if batch.status == "cancelling":
            update.update(status="cancelled", cancelled_at=now)
        elif counts["expired"]:
            update.update(status="expired", expired_at=now)
        else:
            update.update(status="completed", completed_at=now)
        update.update(finalizing_at=now, output_file_id=batch.output_id if counts["completed"] else None,
                      error_file_id=batch.errors_id if counts["failed"] else None)
        batch = batch.model_copy(update=update)
        _store().save(batch)
        return batch
    return batch.model_copy(update=update)


def _public(batch: BatchObject) -> dict[str, Any]:
    return batch.model_dump(mode="json")


@batches_api.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return jsonify(_public(own_batch(batch_id)))


@batches_api.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    """Queued lines never run; running ones stop within a step; the batch ends ``cancelled``."""
    batch = own_batch(batch_id)
    if batch.status not in ("validating", "in_progress"):
        return jsonify(_public(batch))
    batch = batch.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time())})
    _store().save(batch)
    svc = _service()
    for line in _store().lines(batch.id):
        for job_id in line.job_ids:
            svc.store.cancel(job_id)
    found = _store().batch(batch.id)
    assert found is not None
    return jsonify(_public(_progress(*found)))


@batches_api.get("/batches")
def list_batches() -> Response:
    """The caller's batches, newest first; ``after`` (a batch id) and ``limit`` (1–100) page through them."""
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise _invalid("limit", "an integer from 1 to 100")
    ids = _store().batch_ids(current_owner())
    after = request.args.get("after")
    start = ids.index(after) + 1 if after in ids else 0
    page = ids[start : start + limit]
    data = [_public(own_batch(batch_id)) for batch_id in page]
    return jsonify({"object": "list", "data": data, "first_id": page[0] if page else None,
                    "last_id": page[-1] if page else None, "has_more": start + limit < len(ids)})


# -- results -------------------------------------------------------------------------------------


def _result_lines(batch: BatchObject, errors: bool) -> Iterator[bytes]:
    """The output (or error) file: one JSON line per request, from the job records."""
    store = _service().store
    for chunk in _store().line_chunks(batch.id):
        # The chunk's job records in one round trip, not one per job.
        found = iter(store.get_many([job_id for line in chunk for job_id in line.job_ids]))
        yield from _result_chunk(chunk, [[next(found) for _ in line.job_ids] for line in chunk], errors)


def _result_chunk(chunk: list[BatchLine], chunk_jobs: list[list[Job | None]], errors: bool) -> Iterator[bytes]:
    for line, jobs in zip(chunk, chunk_jobs, strict=True):
        failed = next((job for job in jobs if job is None or job.status is not JobStatus.SUCCEEDED), None)
        if failed is None and not errors:
            req = CompletionRequest.model_validate(line.request)
            completion = Completion(f"cmpl-{line.job_ids[0]}", jobs[0].model, "text_completion", len(req.prompts),
                                    req.n)
            body = completion.body(jobs, completion_choices(jobs, req))
            yield _jsonl({"id": f"batch_req_{line.job_ids[0]}", "custom_id": line.custom_id,
                          "response": {"status_code": 200, "request_id": line.job_ids[0], "body": body},
                          "error": None})
        elif failed is not None and errors:
            yield _jsonl({"id": f"batch_req_{line.job_ids[0]}", "custom_id": line.custom_id, "response": None,
                          "error": _line_error(failed)})


def _line_error(job: Job | None) -> dict[str, str]:
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


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
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context

from jobs.batches import (
    ERRORS_SUFFIX,
    OUTPUT_SUFFIX,
    TERMINAL_BATCH,
    BatchLine,
    BatchObject,
)
from jobs.schema import Job, JobStatus
from web.http.auth import authenticate_api, current_owner
from web.http.context import current_service
from web.http.errors import ApiError
from web.openai.completion import Completion, completion_choices
from web.openai.schema import CompletionRequest
from web.services.batches import (
    ENDPOINT,
    WINDOWS,
    accept_upload,
    batch_intake,
    batch_progress,
    batch_store,
    check_metadata,
    invalid,
    own_batch,
    start_batch,
    your_batches,
)

log = logging.getLogger(__name__)

batches_api = Blueprint("batches_api", __name__, url_prefix="/v1")
batches_api.before_request(authenticate_api)


def _page_limit() -> int:
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise invalid("limit", "an integer from 1 to 100")
    return limit


# -- files ---------------------------------------------------------------------------------------


@batches_api.post("/files")
def upload_file() -> Response:
    """Multipart ``file`` + ``purpose=batch``."""
    settings = current_service().settings
    upload = request.files.get("file")
    purpose = request.form.get("purpose")
    if upload is None:
        raise invalid("file", "send the file as multipart form data in the field 'file'")
    if purpose != "batch":
        raise invalid("purpose", "only purpose=batch is supported")
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
        raise invalid("order", "asc or desc")
    purpose = request.args.get("purpose")
    files, more = batch_store().files(current_owner(), request.args.get("after"), limit, newest_first=order == "desc")
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
    meta = batch_store().file(file_id)
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
        return Response(batch_store().file_content(file_id) or b"", mimetype="application/jsonl")
    errors = file_id.endswith(ERRORS_SUFFIX)
    return Response(stream_with_context(_result_lines(batch, errors)), mimetype="application/jsonl")


@batches_api.delete("/files/<file_id>")
def delete_file(file_id: str) -> Response:
    meta, batch = _own_file(file_id)
    if meta is None:
        raise invalid("file_id", "a batch's result file goes when its batch does")
    batch_store().delete_file(file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


# -- batches -------------------------------------------------------------------------------------


@batches_api.post("/batches")
def create_batch() -> Response:
    """Validate the input file whole, then queue every line as jobs; a file with any bad line is refused
    (400, every error by line) and nothing is queued."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # Python's JSON reader recurses once per nesting level
        raise invalid("body", "the body is nested too deeply to be a batch request") from None
    if not isinstance(body, dict):
        raise invalid("body", "send a JSON object")
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
    metadata = body.get("metadata")
    if endpoint != ENDPOINT:
        raise invalid("endpoint", f"only {ENDPOINT} is supported")
    if window not in WINDOWS:
        raise invalid("completion_window", f"one of {', '.join(WINDOWS)}")
    check_metadata(metadata)
    if not isinstance(file_id, str):
        raise invalid("input_file_id", "required")
    meta, _ = _own_file(file_id, "input_file_id")
    if meta is None:
        raise invalid("input_file_id", "a batch's result file cannot be a batch's input")
    return jsonify(_public(start_batch(file_id, window, metadata)))


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
    intake = batch_intake()

    def cancelling(current: BatchObject) -> BatchObject | None:
        if current.status in TERMINAL_BATCH or current.status == "cancelling":
            return None
        return current.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time())})

    if batch_store().update(batch_id, cancelling, also=lambda pipe: intake.stage_cancel(pipe, batch_id)) is not None:
        svc = current_service()
        for line in batch_store().lines(batch_id):  # every job queued before the cancel (no more are queued after it)
            for job_id in line.job_ids:
                svc.store.cancel(job_id)
        intake.run(batch_id)  # counts the jobs never queued as failed lines, so the batch can end
    found = batch_store().batch(batch_id)
    assert found is not None
    return jsonify(_public(batch_progress(*found)))


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
    for chunk in batch_store().line_chunks(batch.id):
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


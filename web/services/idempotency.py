"""An Idempotency-Key claimed for one request body: bound to the job it made in the transaction that stores
the job, so a retry with the same key and body gets that job back, and another body a 409."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from jobs.schema import JobRequest


@dataclass(frozen=True)
class IdempotencyClaim:
    """An Idempotency-Key (scoped to its owner) for one request body, about to make job ``job_id``."""

    key: str
    request: JobRequest
    job_id: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.request.model_dump_json().encode()).hexdigest()

    @property
    def redis_key(self) -> str:
        return "bloomq:idempotency:" + hashlib.sha256(self.key.encode()).hexdigest()

    @property
    def binding(self) -> tuple[str, str]:
        return self.redis_key, json.dumps({"fingerprint": self.fingerprint, "job_id": self.job_id})

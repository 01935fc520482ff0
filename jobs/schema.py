"""The job contract shared by web and worker: request, parameters, status and the job resource."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator

from config.models import queue_for

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_SEED = 2**63
# Bounds inside which no value can break the sampler (every score and probability stays finite).
MIN_TEMPERATURE = 1e-4  # a positive temperature below this divides the scores into float overflow
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 250_880  # BLOOM's vocabulary; a top_k at or over a model's vocabulary keeps every token
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MIN_PROBABILITY_MASS = 1e-6  # top_p and typical_p below this would round to 0 in float32
MAX_TOP_N_TOKENS = 5  # alternatives reported per generated token (as TGI and OpenAI allow)
API_JOBS_PATH = "/api/v1/jobs"  # where the web serves job resources
OPERATOR_FIELDS = ("worker", "worker_instance")  # where a job ran (host, process id): operators' business only
PAGE_JOBS_PATH = "/jobs"  # where the web serves job pages


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A random job id (uuid4: 122 random bits)."""
    return str(uuid.uuid4())


class JobStatus(str, Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """True once the job has its one final result."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class FinishReason(str, Enum):
    """Why generation stopped."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELED = "canceled"
    TIMEOUT = "timeout"


# When a job's webhook is called.
WebhookEvent = Literal["started", "completed"]
# Interactive jobs (form, job API, compatible APIs) run before batch jobs (lines of a batch).
PriorityClass = Literal["interactive", "batch"]
MIN_PRIORITY, MAX_PRIORITY = -100, 100


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]


class GenerateParameters(BaseModel):
    """Generation parameters, with the Hugging Face / TGI names."""

    # allow_inf_nan=False: NaN and +-Infinity (which Python's JSON reader accepts) are refused, never stored.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate, not counting the prompt.")
    max_length: int | None = Field(
        None, ge=1, description="Prompt plus new tokens, as in transformers; max_new_tokens wins when both are set."
    )
    min_new_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate before the end-of-text token or a stop sequence may end the "
        "text (as in transformers); at most the job's max_new_tokens."
    )
    ignore_eos: bool = Field(
        False, description="Go on past the end-of-text token, up to the length limit or a stop sequence (as vLLM)."
    )
    do_sample: bool | None = Field(
        None, description="Sample instead of greedy. Unset: sample when a sampling parameter is set."
    )
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description=f"0 means greedy; otherwise at least {MIN_TEMPERATURE:g}."
    )
    top_k: int | None = Field(
        None, ge=1, le=MAX_TOP_K, description="Keep the k most likely tokens; k >= the vocabulary keeps all."
    )
    top_p: float | None = Field(None, ge=MIN_PROBABILITY_MASS, le=1)
    typical_p: float | None = Field(None, ge=MIN_PROBABILITY_MASS, le=1)
    repetition_penalty: float | None = Field(
        None,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="1.0 is no penalty; 2.0 as in the BLOOM tutorial.",
    )
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="Makes sampling reproducible.")
    stop: list[StopString] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, description="Strings that end generation (not returned)."
    )
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    truncate: int | None = Field(None, ge=1, description="Keep only the prompt's last n tokens.")
    details: bool = Field(False, description="Report every generated token: id, text and log-probability.")
    top_n_tokens: int | None = Field(
        None, ge=0, le=MAX_TOP_N_TOKENS, description="With details: the n most likely tokens at each step too."
    )
    decoder_input_details: bool = Field(
        False, description="With details: the prompt's tokens and their log-probabilities too."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @property
    def sampling(self) -> bool:
        """Whether this request samples (True) or decodes greedily (False)."""
        if self.temperature == 0:
            return False  # temperature 0 is the conventional spelling of greedy
        if self.do_sample is not None:
            return self.do_sample
        return (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 1)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    def normalised(self, default_max_new_tokens: int) -> GenerateParameters:
        """These parameters with the decoding mode made explicit and a length limit filled in."""
        changes: dict[str, Any] = {"do_sample": self.sampling}
        if self.max_new_tokens is None and self.max_length is None:
            changes["max_new_tokens"] = default_max_new_tokens
        if self.sampling and self.seed is None:
            # Chosen now, not by the worker: a job that restarts (another worker, a retry) replays the same
            # text, and the seed shows in the job's parameters.
            changes["seed"] = secrets.randbits(63)
        return self.model_copy(update=changes)


class JobRequest(BaseModel):
    """The body of ``POST /api/v1/jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    inputs: Annotated[str, StringConstraints(min_length=1)] = Field(description="The prompt.")
    model: str | None = Field(None, description="A model name; the default model when absent.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    timeout: float | None = Field(
        None, gt=0, description="Seconds from submission after which the job is stopped (capped by the server)."
    )
    webhook: str | None = Field(None, max_length=2048, description="http(s) URL to POST the job resource to.")
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: ["completed"], max_length=2, description="When to call the webhook."
    )
    priority: int = Field(
        0, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="Lower runs first among waiting jobs of its class (as vLLM)."
    )


class TokenDetail(BaseModel):
    """One token with its log-probability under the model (before any sampling transform)."""

    id: int
    text: str
    logprob: float | None = Field(None, description="Natural log; null for a prompt's first token.")
    special: bool = False


class GenerationDetails(BaseModel):
    """Per-token details, for jobs that ask (``parameters.details``)."""

    prefill: list[TokenDetail] = Field(default_factory=list, description="With decoder_input_details.")
    tokens: list[TokenDetail] = Field(default_factory=list)
    top_tokens: list[list[TokenDetail]] | None = Field(None, description="With top_n_tokens: per step, best first.")


class JobOutput(BaseModel):
    """What a finished (or running) job has produced."""

    generated_text: str
    generated_tokens: int
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: int | None = None
    details: GenerationDetails | None = None


class JobError(BaseModel):
    """Why a job failed."""

    type: str
    message: str


class JobMetrics(BaseModel):
    """Timings, in seconds."""

    queue_seconds: float | None = None
    inference_seconds: float | None = None
    seconds_per_token: float | None = None
    time_to_first_token: float | None = Field(None, description="From submission to the first token.")


class Job(BaseModel):
    """One generation job as the store keeps it."""

    id: str
    status: JobStatus = JobStatus.QUEUED
    model: str
    inputs: str
    parameters: GenerateParameters
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: JobOutput | None = None
    error: JobError | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    worker: str | None = None
    worker_instance: str | None = Field(None, description="The worker process start (name, pid, boot id) running it.")
    attempts: int = Field(0, description="How many times a worker has started this job.")
    device_faults: int = Field(
        0, description="Times a worker's device failed fatally while running this job (2: failed as a poison job)."
    )
    deadline: datetime | None = Field(None, description="When the job is stopped if not finished.")
    cancel_requested: bool = False
    webhook: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=list)
    owner: str | None = Field(None, description="The API key (a short id of its hash) that made the job.")
    priority_class: PriorityClass = Field("interactive", description="interactive jobs run before batch jobs.")
    priority: int = Field(0, description="Lower runs first among waiting jobs of its class.")
    batch_id: str | None = Field(None, description="The batch this job is a line of.")
    token_budget: int | None = Field(
        None, description="The most tokens (prompt + new) the job can use: what it holds of a daily token quota.")
    quota_day: str | None = Field(None, description="The UTC day whose token quota the job holds its budget on.")

    @property
    def queue(self) -> str:
        """The Celery queue this job's message goes to."""
        return queue_for(self.model, self.priority_class)

    @field_serializer("created_at", "started_at", "finished_at", "deadline")
    def _iso_utc(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    def overdue(self, now: datetime) -> bool:
        """Still queued at (or past) its deadline: it will never run and is to be failed as expired."""
        return self.status is JobStatus.QUEUED and self.deadline is not None and self.deadline <= now

    def to_json(self) -> str:
        """The stored form."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        """Inverse of :meth:`to_json`."""
        return cls.model_validate_json(raw)

    def to_resource(self, operator: bool = False) -> dict[str, Any]:
        """The JSON resource, with links (paths on the web app); where it ran (``OPERATOR_FIELDS``) only in
        an operator's view, null in a user's (the API's answers to other keys, webhook bodies)."""
        body = self.model_dump(mode="json")
        if not operator:
            body.update(dict.fromkeys(OPERATOR_FIELDS))
        body["urls"] = {"self": f"{API_JOBS_PATH}/{self.id}", "page": f"{PAGE_JOBS_PATH}/{self.id}"}
        return body


class JobResource(Job):
    """The job as the API returns it (documentation schema)."""

    urls: dict[str, str]
    warnings: list[str] | None = Field(None, description="Only on submission: e.g. no worker for the model is live.")

"""One typed settings object, read from the environment (``BLOOMQ_*``).

Every knob is documented once, in docs/configuration.md; a bad value fails loudly and names
the variable. How each kind of value is parsed is in ``config.values``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import config.values as parse
from config.sentinel import DEFAULT_SENTINEL_MASTER, SentinelTarget, parse_sentinel_url


@dataclass(frozen=True)
class Settings:
    """Everything bloomq reads from its environment."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_sentinel_master: str = DEFAULT_SENTINEL_MASTER
    # A submission is answered 202 only once this many replicas acknowledged it (Redis WAIT).
    redis_min_replicas: int = 0
    redis_replica_wait_seconds: float = 1.0
    model: str = "bigscience/bloom-560m"
    extra_models: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 5000
    job_retention_seconds: int = 24 * 3600
    visibility_timeout_seconds: int = 6 * 3600
    default_max_new_tokens: int = 64
    dtype: str = "auto"
    heartbeat_seconds: float = 5.0
    log_level: str = "INFO"
    max_batch_size: int = 32
    max_batch_total_tokens: int | None = None
    batch_wait_ms: float = 5.0
    # Tokens one forward pass may take: every decoding row's one, then prompts in chunks up to this
    # (None: by device, 512 on a GPU, 128 on a CPU).
    step_tokens: int | None = None
    kv_block_tokens: int = 16  # token slots per paged KV block
    prefix_caching: bool = True  # prompts sharing a prefix share its KV blocks
    tensor_parallel: int = 1  # processes (GPUs) per worker group; the model is split across them
    quantize: str = "none"  # weight-only quantization of the linear layers: none, int8, int4
    attention: str = "auto"  # how attention reads the paged KV cache: auto, gather, flex
    # A tensor-parallel group's collectives and its rank 0's silence: longer, and a rank is taken for lost.
    group_timeout_seconds: float = 60.0
    max_job_seconds: float = 3600.0
    webhook_secret: str = field(default="", repr=False)
    webhook_allow: tuple[str, ...] = ()
    # A whole webhook attempt (connect, TLS, request, status and headers), however slowly the receiver answers.
    webhook_timeout_seconds: float = 15.0
    stream_max_seconds: float = 300.0
    # How long an OpenAI- or TGI-compatible request holds its connection for its jobs (answer or stream);
    # None: the longest a job may take, plus a minute.
    compat_wait_seconds: float | None = None
    worker_host: str = ""
    max_body_bytes: int = 1024 * 1024
    max_queue: int = 10_000
    stuck_grace_seconds: float = 120.0
    lost_delivery_seconds: float = 30.0
    result_patience_seconds: float = 600.0
    log_format: str = "json"
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str = ""
    # Keys (or sha256:<hex> of keys) that may also see operational details; each is an API key too.
    operator_keys: tuple[str, ...] = field(default=(), repr=False)
    rate_limit: str = ""
    # Where users reach the web (behind a proxy, the proxy's URL): https makes the session cookie Secure.
    public_url: str = ""
    # Per-key token and job counters in /metrics (a series per key: off by default, for cardinality).
    metrics_per_key: bool = False
    secret_key: str = field(default="", repr=False)
    chat_templates: dict[str, str] = field(default_factory=dict, repr=False)
    max_batch_file_bytes: int = 16 * 1024 * 1024
    max_batch_lines: int = 10_000
    # What one key's uploaded files may hold in Redis at once (they are kept for the retention period).
    max_file_bytes_per_key: int = 256 * 1024 * 1024
    # Watchers: the event streams and long polls the web holds open while they wait.
    max_watchers: int = 1000
    max_watchers_per_key: int = 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        defaults = cls()
        return cls(**{
            name: parse.read(env, variable, getattr(defaults, name), cast) for name, variable, cast in VARIABLES
        })

    @property
    def host_name(self) -> str:
        """How workers name this machine (``BLOOMQ_WORKER_HOST``, else the hostname)."""
        return self.worker_host or socket.gethostname()

    @property
    def compat_wait_limit(self) -> float:
        """Seconds a compatible request waits for its jobs (``BLOOMQ_COMPAT_WAIT_SECONDS``, else the longest a
        job may take plus a minute)."""
        return self.compat_wait_seconds if self.compat_wait_seconds is not None else self.max_job_seconds + 60

    @property
    def redis_sentinel(self) -> SentinelTarget | None:
        """Where Sentinel says the master is, when ``BLOOMQ_REDIS_URL`` is a sentinel:// URL; else None."""
        return parse_sentinel_url(self.redis_url, self.redis_sentinel_master)

    @property
    def model_refs(self) -> tuple[str, ...]:
        """The default model first, then any extra configured models, without repeats."""
        refs: list[str] = []
        for ref in (self.model, *self.extra_models):
            if ref not in refs:
                refs.append(ref)
        return tuple(refs)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (handy in tests)."""
        return dataclasses.replace(self, **changes)


# Each field, the variable it is read from, and how the value is parsed.
VARIABLES: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("redis_url", "BLOOMQ_REDIS_URL", parse.redis_url),
    ("redis_sentinel_master", "BLOOMQ_REDIS_SENTINEL_MASTER", str),
    ("redis_min_replicas", "BLOOMQ_REDIS_MIN_REPLICAS", parse.non_negative_int),
    ("redis_replica_wait_seconds", "BLOOMQ_REDIS_REPLICA_WAIT_SECONDS", parse.positive_float),
    ("model", "BLOOMQ_MODEL", str),
    ("extra_models", "BLOOMQ_MODELS", parse.comma_list),
    ("host", "BLOOMQ_HOST", str),
    ("port", "BLOOMQ_PORT", parse.port),
    ("job_retention_seconds", "BLOOMQ_JOB_RETENTION", parse.positive_int),
    ("visibility_timeout_seconds", "BLOOMQ_VISIBILITY_TIMEOUT", parse.positive_int),
    ("default_max_new_tokens", "BLOOMQ_DEFAULT_MAX_NEW_TOKENS", parse.positive_int),
    ("dtype", "BLOOMQ_DTYPE", parse.dtype),
    ("heartbeat_seconds", "BLOOMQ_HEARTBEAT_SECONDS", parse.positive_float),
    ("log_level", "BLOOMQ_LOG_LEVEL", parse.log_level),
    ("max_batch_size", "BLOOMQ_MAX_BATCH_SIZE", parse.positive_int),
    ("max_batch_total_tokens", "BLOOMQ_MAX_BATCH_TOTAL_TOKENS", parse.positive_int),
    ("batch_wait_ms", "BLOOMQ_BATCH_WAIT_MS", parse.non_negative_float),
    ("step_tokens", "BLOOMQ_STEP_TOKENS", parse.positive_int),
    ("kv_block_tokens", "BLOOMQ_KV_BLOCK_TOKENS", parse.block_tokens),
    ("prefix_caching", "BLOOMQ_PREFIX_CACHING", parse.switch),
    ("tensor_parallel", "BLOOMQ_TENSOR_PARALLEL", parse.positive_int),
    ("quantize", "BLOOMQ_QUANTIZE", parse.quantization),
    ("attention", "BLOOMQ_ATTENTION", parse.attention),
    ("group_timeout_seconds", "BLOOMQ_GROUP_TIMEOUT", parse.positive_float),
    ("max_job_seconds", "BLOOMQ_MAX_JOB_SECONDS", parse.positive_float),
    ("webhook_secret", "BLOOMQ_WEBHOOK_SECRET", str),
    ("webhook_allow", "BLOOMQ_WEBHOOK_ALLOW", parse.comma_list),
    ("webhook_timeout_seconds", "BLOOMQ_WEBHOOK_TIMEOUT_SECONDS", parse.positive_float),
    ("stream_max_seconds", "BLOOMQ_STREAM_MAX_SECONDS", parse.positive_float),
    ("compat_wait_seconds", "BLOOMQ_COMPAT_WAIT_SECONDS", parse.positive_float),
    ("worker_host", "BLOOMQ_WORKER_HOST", str),
    ("max_body_bytes", "BLOOMQ_MAX_BODY_BYTES", parse.positive_int),
    ("max_queue", "BLOOMQ_MAX_QUEUE", parse.positive_int),
    ("stuck_grace_seconds", "BLOOMQ_STUCK_GRACE_SECONDS", parse.positive_float),
    ("lost_delivery_seconds", "BLOOMQ_LOST_DELIVERY_SECONDS", parse.positive_float),
    ("result_patience_seconds", "BLOOMQ_RESULT_PATIENCE_SECONDS", parse.positive_float),
    ("log_format", "BLOOMQ_LOG_FORMAT", parse.log_format),
    ("api_keys", "BLOOMQ_API_KEYS", parse.comma_list),
    ("api_keys_file", "BLOOMQ_API_KEYS_FILE", parse.existing_file),
    ("operator_keys", "BLOOMQ_OPERATOR_KEYS", parse.operator_keys),
    ("rate_limit", "BLOOMQ_RATE_LIMIT", parse.rate_limit),
    ("public_url", "BLOOMQ_PUBLIC_URL", parse.public_url),
    ("metrics_per_key", "BLOOMQ_METRICS_PER_KEY", parse.switch),
    ("secret_key", "BLOOMQ_SECRET_KEY", str),
    ("chat_templates", "BLOOMQ_CHAT_TEMPLATES", parse.chat_templates),
    ("max_batch_file_bytes", "BLOOMQ_MAX_BATCH_FILE_BYTES", parse.positive_int),
    ("max_batch_lines", "BLOOMQ_MAX_BATCH_LINES", parse.positive_int),
    ("max_file_bytes_per_key", "BLOOMQ_MAX_FILE_BYTES_PER_KEY", parse.positive_int),
    ("max_watchers", "BLOOMQ_MAX_WATCHERS", parse.positive_int),
    ("max_watchers_per_key", "BLOOMQ_MAX_WATCHERS_PER_KEY", parse.positive_int),
)

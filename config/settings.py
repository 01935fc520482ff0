"""One typed settings object, read from the environment (``BLOOMQ_*``).

Every knob is documented once, in the README's configuration table; a bad value fails loudly and names
the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

T = TypeVar("T")


class SettingsError(ValueError):
    """A BLOOMQ_* environment variable has a value that cannot be used."""


def _read(env: Mapping[str, str], name: str, default: T, cast: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw.strip())
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}={raw!r} is not valid: {exc}") from exc


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be zero or a positive number")
    return value


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")


def _block_tokens(raw: str) -> int:
    value = _positive_int(raw)
    if value & (value - 1):
        raise ValueError("must be a power of two (1, 2, 4, ... 256)")
    if value > 256:
        raise ValueError("must be at most 256")
    return value


def _existing_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError("no such file")
    return raw


def _rate_limit(raw: str) -> str:
    from limits import parse_many  # flask-limiter's own parser, so a bad value fails at start-up

    parse_many(raw)
    return raw


SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_MASTER = "mymaster"


@dataclass(frozen=True)
class SentinelTarget:
    """A Redis reached through Sentinel: the sentinels to ask, the master's name, the database."""

    sentinels: tuple[tuple[str, int], ...]
    master: str = DEFAULT_SENTINEL_MASTER
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def broker_url(self) -> str:
        """The URL as kombu's Sentinel transport reads it: it takes credentials and database from the
        first entry only, so every entry carries them."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"{SENTINEL_SCHEME}://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sentinel_url(url: str, master: str = DEFAULT_SENTINEL_MASTER) -> SentinelTarget | None:
    """``sentinel://h1:26379;sentinel://h2:26379/0`` (Celery's spelling) as a SentinelTarget; None for a
    plain Redis URL. A database or credentials given on any entry apply to all; entries may not disagree."""
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return None
    sentinels, dbs, users, passwords = [], set(), set(), set()
    for entry in url.split(";"):
        parts = urlsplit(entry.strip())
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"{entry!r}: every entry must be sentinel://host:port")
        sentinels.append((parts.hostname, parts.port or 26379))
        if parts.path.strip("/"):
            dbs.add(int(parts.path.strip("/")))
        if parts.username:
            users.add(unquote(parts.username))
        if parts.password is not None:
            passwords.add(unquote(parts.password))
    if len(dbs) > 1 or len(users) > 1 or len(passwords) > 1:
        raise ValueError("the entries name different databases or credentials")
    return SentinelTarget(tuple(sentinels), master, dbs.pop() if dbs else 0, users.pop() if users else None,
                          passwords.pop() if passwords else None)


def _redis_url(raw: str) -> str:
    scheme = urlsplit(raw).scheme
    if scheme not in ("redis", "rediss", "unix", SENTINEL_SCHEME):
        raise ValueError("must be a redis://, rediss://, unix:// or sentinel://host:port;sentinel://... URL")
    parse_sentinel_url(raw)
    return raw


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in ("json", "text"):
        raise ValueError("must be json or text")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _operator_keys(raw: str) -> tuple[str, ...]:
    """Keys, or ``sha256:<hex>`` of keys (so a key held only as a hash in the key file can be an operator)."""
    keys = _comma_list(raw)
    for key in keys:
        digest = key.removeprefix("sha256:")
        if key.startswith("sha256:") and (len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest)):
            raise ValueError("a sha256: entry must be followed by 64 hex digits")
    return keys


def _chat_templates(raw: str) -> dict[str, str]:
    """``model=path,model2=path2``: each model's chat template (Jinja), read now so a bad path fails loudly."""
    templates = {}
    for item in _comma_list(raw):
        model, sep, path = item.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ValueError(f"{item!r}: expected model=path/to/template.jinja")
        try:
            with open(path.strip(), encoding="utf-8") as source:
                templates[model.strip()] = source.read()
        except OSError as exc:
            raise ValueError(f"{item!r}: cannot read the template: {exc.strerror}") from exc
    return templates


def _dtype(raw: str) -> str:
    value = raw.lower()
    value = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(value, value)
    if value not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)} (or fp32, fp16, bf16)")
    return value


def _log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8", "int4")


def _quantization(raw: str) -> str:
    value = raw.strip().lower()
    if value not in QUANTIZATIONS:
        raise ValueError(f"must be one of {', '.join(QUANTIZATIONS)}")
    return value


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
        d = cls()
        return cls(
            redis_url=_read(env, "BLOOMQ_REDIS_URL", d.redis_url, _redis_url),
            redis_sentinel_master=_read(env, "BLOOMQ_REDIS_SENTINEL_MASTER", d.redis_sentinel_master, str),
            redis_min_replicas=_read(env, "BLOOMQ_REDIS_MIN_REPLICAS", d.redis_min_replicas, _non_negative_int),
            redis_replica_wait_seconds=_read(
                env, "BLOOMQ_REDIS_REPLICA_WAIT_SECONDS", d.redis_replica_wait_seconds, _positive_float
            ),
            model=_read(env, "BLOOMQ_MODEL", d.model, str),
            extra_models=_read(env, "BLOOMQ_MODELS", d.extra_models, _comma_list),
            host=_read(env, "BLOOMQ_HOST", d.host, str),
            port=_read(env, "BLOOMQ_PORT", d.port, _port),
            job_retention_seconds=_read(env, "BLOOMQ_JOB_RETENTION", d.job_retention_seconds, _positive_int),
            visibility_timeout_seconds=_read(
                env, "BLOOMQ_VISIBILITY_TIMEOUT", d.visibility_timeout_seconds, _positive_int
            ),
            default_max_new_tokens=_read(
                env, "BLOOMQ_DEFAULT_MAX_NEW_TOKENS", d.default_max_new_tokens, _positive_int
            ),
            dtype=_read(env, "BLOOMQ_DTYPE", d.dtype, _dtype),
            heartbeat_seconds=_read(env, "BLOOMQ_HEARTBEAT_SECONDS", d.heartbeat_seconds, _positive_float),
            log_level=_read(env, "BLOOMQ_LOG_LEVEL", d.log_level, _log_level),
            max_batch_size=_read(env, "BLOOMQ_MAX_BATCH_SIZE", d.max_batch_size, _positive_int),
            max_batch_total_tokens=_read(env, "BLOOMQ_MAX_BATCH_TOTAL_TOKENS", d.max_batch_total_tokens, _positive_int),
            batch_wait_ms=_read(env, "BLOOMQ_BATCH_WAIT_MS", d.batch_wait_ms, _non_negative_float),
            step_tokens=_read(env, "BLOOMQ_STEP_TOKENS", d.step_tokens, _positive_int),
            kv_block_tokens=_read(env, "BLOOMQ_KV_BLOCK_TOKENS", d.kv_block_tokens, _block_tokens),
            prefix_caching=_read(env, "BLOOMQ_PREFIX_CACHING", d.prefix_caching, _switch),
            tensor_parallel=_read(env, "BLOOMQ_TENSOR_PARALLEL", d.tensor_parallel, _positive_int),
            quantize=_read(env, "BLOOMQ_QUANTIZE", d.quantize, _quantization),
            group_timeout_seconds=_read(env, "BLOOMQ_GROUP_TIMEOUT", d.group_timeout_seconds, _positive_float),
            max_job_seconds=_read(env, "BLOOMQ_MAX_JOB_SECONDS", d.max_job_seconds, _positive_float),
            webhook_secret=_read(env, "BLOOMQ_WEBHOOK_SECRET", d.webhook_secret, str),
            webhook_allow=_read(env, "BLOOMQ_WEBHOOK_ALLOW", d.webhook_allow, _comma_list),
            webhook_timeout_seconds=_read(
                env, "BLOOMQ_WEBHOOK_TIMEOUT_SECONDS", d.webhook_timeout_seconds, _positive_float
            ),
            stream_max_seconds=_read(env, "BLOOMQ_STREAM_MAX_SECONDS", d.stream_max_seconds, _positive_float),
            compat_wait_seconds=_read(env, "BLOOMQ_COMPAT_WAIT_SECONDS", d.compat_wait_seconds, _positive_float),
            worker_host=_read(env, "BLOOMQ_WORKER_HOST", d.worker_host, str),
            max_body_bytes=_read(env, "BLOOMQ_MAX_BODY_BYTES", d.max_body_bytes, _positive_int),
            max_queue=_read(env, "BLOOMQ_MAX_QUEUE", d.max_queue, _positive_int),
            stuck_grace_seconds=_read(env, "BLOOMQ_STUCK_GRACE_SECONDS", d.stuck_grace_seconds, _positive_float),
            lost_delivery_seconds=_read(env, "BLOOMQ_LOST_DELIVERY_SECONDS", d.lost_delivery_seconds, _positive_float),
            result_patience_seconds=_read(
                env, "BLOOMQ_RESULT_PATIENCE_SECONDS", d.result_patience_seconds, _positive_float
            ),
            log_format=_read(env, "BLOOMQ_LOG_FORMAT", d.log_format, _log_format),
            api_keys=_read(env, "BLOOMQ_API_KEYS", d.api_keys, _comma_list),
            api_keys_file=_read(env, "BLOOMQ_API_KEYS_FILE", d.api_keys_file, _existing_file),
            operator_keys=_read(env, "BLOOMQ_OPERATOR_KEYS", d.operator_keys, _operator_keys),
            rate_limit=_read(env, "BLOOMQ_RATE_LIMIT", d.rate_limit, _rate_limit),
            secret_key=_read(env, "BLOOMQ_SECRET_KEY", d.secret_key, str),
            chat_templates=_read(env, "BLOOMQ_CHAT_TEMPLATES", d.chat_templates, _chat_templates),
            max_batch_file_bytes=_read(env, "BLOOMQ_MAX_BATCH_FILE_BYTES", d.max_batch_file_bytes, _positive_int),
            max_batch_lines=_read(env, "BLOOMQ_MAX_BATCH_LINES", d.max_batch_lines, _positive_int),
            max_file_bytes_per_key=_read(env, "BLOOMQ_MAX_FILE_BYTES_PER_KEY", d.max_file_bytes_per_key,
                                         _positive_int),
            max_watchers=_read(env, "BLOOMQ_MAX_WATCHERS", d.max_watchers, _positive_int),
            max_watchers_per_key=_read(env, "BLOOMQ_MAX_WATCHERS_PER_KEY", d.max_watchers_per_key, _positive_int),
        )

    @property
    def host_name(self) -> str:
        """How workers name this machine (``BLOOMQ_WORKER_HOST``, else the hostname)."""
        import socket

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
        from dataclasses import replace

        return replace(self, **changes)

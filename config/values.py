"""How a ``BLOOMQ_*`` value is read: one reader, and one parser for each kind of value, each failing with
the reason a value cannot be used."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

from limits import parse_many  # flask-limiter's own parser, so a bad rate limit fails at start-up

from config.sentinel import SENTINEL_SCHEME, parse_sentinel_url

T = TypeVar("T")


class SettingsError(ValueError):
    """A BLOOMQ_* environment variable has a value that cannot be used."""


def read(env: Mapping[str, str], name: str, default: T, cast: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw.strip())
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}={raw!r} is not valid: {exc}") from exc


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be zero or a positive number")
    return value


def switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")


def block_tokens(raw: str) -> int:
    value = positive_int(raw)
    if value & (value - 1):
        raise ValueError("must be a power of two (1, 2, 4, ... 256)")
    if value > 256:
        raise ValueError("must be at most 256")
    return value


def existing_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError("no such file")
    return raw


def rate_limit(raw: str) -> str:
    parse_many(raw)
    return raw


def redis_url(raw: str) -> str:
    scheme = urlsplit(raw).scheme
    if scheme not in ("redis", "rediss", "unix", SENTINEL_SCHEME):
        raise ValueError("must be a redis://, rediss://, unix:// or sentinel://host:port;sentinel://... URL")
    parse_sentinel_url(raw)
    return raw


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def log_format(raw: str) -> str:
    value = raw.lower()
    if value not in ("json", "text"):
        raise ValueError("must be json or text")
    return value


def port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def comma_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def operator_keys(raw: str) -> tuple[str, ...]:
    """Keys, or ``sha256:<hex>`` of keys (so a key held only as a hash in the key file can be an operator)."""
    keys = comma_list(raw)
    for key in keys:
        digest = key.removeprefix("sha256:")
        if key.startswith("sha256:") and (len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest)):
            raise ValueError("a sha256: entry must be followed by 64 hex digits")
    return keys


def chat_templates(raw: str) -> dict[str, str]:
    """``model=path,model2=path2``: each model's chat template (Jinja), read now so a bad path fails loudly."""
    templates = {}
    for item in comma_list(raw):
        model, sep, path = item.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ValueError(f"{item!r}: expected model=path/to/template.jinja")
        try:
            with open(path.strip(), encoding="utf-8") as source:
                templates[model.strip()] = source.read()
        except OSError as exc:
            raise ValueError(f"{item!r}: cannot read the template: {exc.strerror}") from exc
    return templates


def dtype(raw: str) -> str:
    value = raw.lower()
    value = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(value, value)
    if value not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)} (or fp32, fp16, bf16)")
    return value


def log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8", "int4")
ATTENTIONS = ("auto", "gather", "flex")  # how attention reads the paged KV cache (worker.engine.flex.choose)


def quantization(raw: str) -> str:
    value = raw.strip().lower()
    if value not in QUANTIZATIONS:
        raise ValueError(f"must be one of {', '.join(QUANTIZATIONS)}")
    return value


def attention(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ATTENTIONS:
        raise ValueError(f"must be one of {', '.join(ATTENTIONS)}")
    return value


def public_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")

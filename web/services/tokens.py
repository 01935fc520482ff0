"""Prompt token counting in the web process, with the model's own ``tokenizer.json`` and the
``tokenizers`` library (no torch, no transformers). Where the file is not on this machine (a hub model
never downloaded here), counting is left to the worker, which fails an over-long job at once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from tokenizers import Tokenizer

from config.models import ModelSpec

log = logging.getLogger(__name__)


class PromptCounter:
    """Counts prompt tokens per model; remembers each model's tokenizer (or its absence)."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, Tokenizer | None] = {}
        self._lock = threading.Lock()

    def count(self, spec: ModelSpec, prompt: str) -> int | None:
        """Tokens in ``prompt`` for ``spec``, or None when its tokenizer is not available here."""
        tokenizer = self._tokenizer(spec)
        return None if tokenizer is None else len(tokenizer.encode(prompt).ids)

    def _tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        with self._lock:
            if spec.name not in self._tokenizers:
                self._tokenizers[spec.name] = _load(spec)
            return self._tokenizers[spec.name]


def _load(spec: ModelSpec) -> Tokenizer | None:
    local = Path(spec.source) / "tokenizer.json"
    path: str | None = str(local) if local.is_file() else None
    if path is None and not Path(spec.source).exists() and spec.source.count("/") == 1:
        cached = try_to_load_from_cache(spec.source, "tokenizer.json")
        path = cached if isinstance(cached, str) else None
    if path is None:
        log.info("no tokenizer.json for %s here: prompt lengths are checked by the worker", spec.name)
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception:  # a file tokenizers cannot read: the worker checks instead
        log.warning("could not read %s; prompt lengths are checked by the worker", path, exc_info=True)
        return None

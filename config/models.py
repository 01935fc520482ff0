"""The model registry: BLOOM family presets, plus ad hoc models named by hub id or local directory."""

from __future__ import annotations

import re
from dataclasses import dataclass

# BLOOM was trained on 2048-token sequences; ALiBi lets it read a little past that, but quality drops,
# so the presets stop there.
BLOOM_CONTEXT = 2048


def queue_for(model_name: str, priority_class: str = "interactive") -> str:
    """The Celery queue of a model (by its short name) for a priority class: ``interactive`` jobs (form,
    job API, the compatible APIs) and ``batch`` jobs (lines of a batch) wait apart, and workers take from
    the interactive queue first."""
    return f"bloomq.{model_name}" if priority_class == "interactive" else f"bloomq.{model_name}.{priority_class}"


@dataclass(frozen=True)
class ModelShape:
    """A BLOOM's size, enough to plan where it fits: layers, hidden width, attention heads, vocabulary."""

    n_layer: int
    hidden: int
    n_head: int
    vocab: int = 250880

    @property
    def embedding_params(self) -> int:
        """The word embeddings (tied to the LM head) and their LayerNorm, plus the final LayerNorm."""
        return self.vocab * self.hidden + 4 * self.hidden

    @property
    def linear_params(self) -> int:
        """Every layer's projections (what weight-only quantization shrinks) with their biases and norms:
        qkv 3h^2, dense h^2, the MLP 8h^2, and 13h of biases and LayerNorm parameters."""
        return self.n_layer * (12 * self.hidden**2 + 13 * self.hidden)

    @property
    def params(self) -> int:
        return self.embedding_params + self.linear_params

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.n_layer * self.hidden * itemsize


# The published BLOOM and BLOOMZ sizes (bloomz-* and bloomz-7b1-mt share their base model's shape).
SHAPES: dict[str, ModelShape] = {
    "bloom-560m": ModelShape(24, 1024, 16),
    "bloom-1b1": ModelShape(24, 1536, 16),
    "bloom-1b7": ModelShape(24, 2048, 16),
    "bloom-3b": ModelShape(30, 2560, 32),
    "bloom-7b1": ModelShape(30, 4096, 32),
    "bloom": ModelShape(70, 14336, 112),
}
for _base in list(SHAPES):
    SHAPES[_base.replace("bloom", "bloomz", 1)] = SHAPES[_base]
SHAPES["bloomz-7b1-mt"] = SHAPES["bloom-7b1"]
SHAPES["bloomz-mt"] = SHAPES["bloom"]


@dataclass(frozen=True)
class ModelSpec:
    """How to load and limit one model."""

    name: str
    source: str  # a Hugging Face hub id or a local directory
    dtype: str = "auto"  # "auto": worker.model.precision (bf16 where the device has it natively, else fp16/fp32)
    max_input_tokens: int = 1024
    max_total_tokens: int = BLOOM_CONTEXT
    shape: ModelShape | None = None  # known for the presets (and local copies of them)

    @property
    def queue(self) -> str:
        """The Celery queue this model's workers consume."""
        return queue_for(self.name)

    @property
    def batch_queue(self) -> str:
        """The Celery queue of this model's batch jobs (taken only when the interactive one is empty)."""
        return queue_for(self.name, "batch")

    @property
    def max_new_tokens(self) -> int:
        """The most tokens a job may ask for (before its prompt is counted)."""
        return self.max_total_tokens - 1


_PRESET_NAMES = (
    "bloom-560m",
    "bloom-1b1",
    "bloom-1b7",
    "bloom-3b",
    "bloom-7b1",
    "bloom",
    "bloomz-560m",
    "bloomz-1b1",
    "bloomz-1b7",
    "bloomz-3b",
    "bloomz-7b1",
    "bloomz-7b1-mt",
    "bloomz",
    "bloomz-mt",
)

PRESETS: dict[str, ModelSpec] = {
    name: ModelSpec(name=name, source=f"bigscience/{name}", shape=SHAPES[name]) for name in _PRESET_NAMES
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class UnknownModelError(ValueError):
    """A model reference that is neither a preset, a hub id nor a usable directory name."""


def model_name(ref: str) -> str:
    """The short name of a model reference: the last path component.

    ``bigscience/bloom-560m`` -> ``bloom-560m``; ``/data/my-bloom/`` -> ``my-bloom``.
    """
    name = ref.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if not _NAME_RE.match(name):
        raise UnknownModelError(f"cannot derive a model name from {ref!r}")
    return name


def resolve_model(ref: str) -> ModelSpec:
    """The spec for a preset name, a preset's hub id, any other hub id, or a local directory."""
    name = model_name(ref)
    preset = PRESETS.get(name)
    if preset is not None and ref in (name, preset.source):
        return preset
    if preset is not None:
        # A local copy or a mirror of a preset keeps the preset's limits but loads from ``ref``.
        return ModelSpec(
            name=name,
            source=ref,
            dtype=preset.dtype,
            max_input_tokens=preset.max_input_tokens,
            max_total_tokens=preset.max_total_tokens,
            shape=preset.shape,
        )
    return ModelSpec(name=name, source=ref)


class ModelRegistry:
    """The models this deployment accepts jobs for: the presets plus the configured references."""

    def __init__(self, refs: tuple[str, ...]) -> None:
        if not refs:
            raise ValueError("at least one model must be configured")
        self.configured: tuple[ModelSpec, ...] = tuple(resolve_model(ref) for ref in refs)
        self._by_name: dict[str, ModelSpec] = dict(PRESETS)
        for spec in self.configured:
            self._by_name[spec.name] = spec

    @property
    def default(self) -> ModelSpec:
        """The model a job gets when it names none."""
        return self.configured[0]

    def get(self, name: str) -> ModelSpec | None:
        """The spec registered under ``name`` (a short name or a configured reference)."""
        spec = self._by_name.get(name)
        if spec is not None:
            return spec
        for configured in self.configured:
            if name == configured.source:
                return configured
        preset = PRESETS.get(name.rsplit("/", 1)[-1])
        if preset is not None and name == preset.source:
            return preset
        return None

    def names(self) -> list[str]:
        """Every name a job may use."""
        return sorted(self._by_name)

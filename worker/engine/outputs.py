"""What the engine gives back for a request: its text, why it stopped, and the token details it asked for.

Plain dataclasses of the engine's own; the worker turns a ``Completion`` into the job's output, whose
fields have the same names (``worker.runner.job_output``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Why a sequence stopped generating (the values are the job API's)."""

    LENGTH = "length"  # max_new_tokens, or the model's total length
    EOS_TOKEN = "eos_token"  # the model ended its text
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings
    CANCELED = "canceled"  # ``Engine.cancel``
    TIMEOUT = "timeout"  # the ``timeout`` given to ``Engine.submit`` ran out


@dataclass(frozen=True)
class Token:
    """One token with its log-probability under the model's raw scores (None for a prompt's first)."""

    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class Details:
    """A request's token details (``SamplingParams.details``)."""

    prefill: list[Token] = field(default_factory=list)  # with decoder_input_details
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] | None = None  # with top_n_tokens: per step, best first


@dataclass(frozen=True)
class Completion:
    """A finished request's text and counts."""

    generated_text: str
    generated_tokens: int
    finish_reason: FinishReason | None
    seed: int | None  # the seed a sampling request used (drawn when it gave none)
    prompt_tokens: int
    details: Details | None = None

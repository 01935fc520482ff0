"""What one request asks of the engine: its length, its decoding and what it wants reported.

The engine's own type, so that it can be driven in-process (a benchmark, a notebook, a test) without the
job queue; the worker fills it from a job's parameters (``worker.runner.engine_params``). The names are
transformers' and TGI's. As in transformers' ``generate``, ``do_sample`` alone decides between sampling
and greedy decoding: a temperature or top-k without it changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """One request's parameters. Give ``max_new_tokens`` or ``max_length`` (prompt plus new tokens)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None  # the end-of-text token and stop sequences wait until this many
    ignore_eos: bool = False  # the end-of-text token does not end the text
    do_sample: bool = False
    temperature: float | None = None  # sampling only; None or 0: 1.0
    top_k: int | None = None  # sampling only; None: every token
    top_p: float | None = None  # sampling only; None: 1.0 (off)
    typical_p: float | None = None  # sampling only; None: 1.0 (off)
    repetition_penalty: float | None = None  # greedy and sampling; None: 1.0 (off)
    seed: int | None = None  # sampling without a seed draws one (reported in the completion)
    stop: Sequence[str] = ()  # strings that end generation, not included in the text
    return_full_text: bool = False  # the completion's text starts with the prompt
    truncate: int | None = None  # keep only the prompt's last n tokens
    details: bool = False  # each new token's id, text and log-probability
    top_n_tokens: int | None = None  # with details: the n most likely tokens at each step too
    decoder_input_details: bool = False  # with details: the prompt's tokens and log-probabilities too

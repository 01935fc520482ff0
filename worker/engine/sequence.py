"""One request inside the engine: its prompt and parameters, the tokens so far, where its keys/values live,
and how its caller learns that it is done."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from worker.engine.outputs import FinishReason
from worker.engine.params import SamplingParams
from worker.engine.sampling import RowSampling


@dataclass(frozen=True)
class StepDetail:
    """A row's chosen token's log-probability in one step, and the most likely tokens (best first)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """One request's whole state.

    ``ids`` is the row's whole text as token ids (prompt, then every token chosen so far); the keys and
    values of its first ``computed`` positions are in the blocks of ``table`` (block ``i`` holds positions
    ``i * block_size`` onwards). ``computed`` runs one behind ``len(ids)`` while the row decodes: its newest
    token is fed in the next step.
    """

    prompt: str
    params: SamplingParams
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: RowSampling
    stop: list[str]
    eos_token_ids: frozenset[int]
    min_new_tokens: int = 0  # the end-of-text token and stop sequences wait until this many tokens
    ignore_eos: bool = False  # the end-of-text token does not end the text
    stops_from: int = 0  # where in ``text`` a stop sequence may begin (after min_new_tokens' text)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with params.details: each new token's log-probability
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.top_n_tokens
    prefill_logprobs: list[float | None] = field(default_factory=list)  # with params.decoder_input_details
    text: str = ""  # the text of ``tokens`` so far (kept up to date incrementally; final once done)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    deadline: float | None = None  # time.perf_counter() value after which the sequence is stopped
    cancelled: bool = False  # set by another thread; the engine stops the sequence at its next step
    isolated: bool = False  # suspected of crashing a worker: runs alone, never batched with others
    rank: tuple[int, int] = (0, 0)  # (priority class, priority): lower is admitted first
    restarts: int = 0  # times the engine started it over from its prompt, forgetting its tokens
    preemptions: int = 0  # times it gave its blocks back mid-way (its tokens kept, recomputed on return)
    reused_tokens: int = 0  # prompt positions whose keys/values came from the prefix cache
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    first_token_at: float | None = None  # when its first token was chosen (the time to first token)
    done: threading.Event = field(default_factory=threading.Event)
    # -- the engine's bookkeeping ------------------------------------------------------------------
    ids: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    computed: int = 0
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of ids' full blocks, as far as computed
    indexed: int = 0  # blocks of ``table`` offered to the prefix index so far
    seen: torch.Tensor | None = None  # [vocab] bool: tokens present in ids (repetition penalty)
    decoder: object | None = None  # the incremental detokenizer of ``tokens``
    held: int = 0  # newest tokens whose text the detokenizer holds back (an unfinished character)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still generate."""
        return self.max_new_tokens - len(self.tokens)

    @property
    def pending(self) -> int:
        """Positions whose keys/values are still to be computed before the row can choose a token."""
        return len(self.ids) - self.computed

    @property
    def in_prompt(self) -> bool:
        """Whether the next positions to compute are still the prompt's (its logits are not needed)."""
        return self.computed < self.prompt_len

    def record(self, token: int, detail: StepDetail | None) -> None:
        """Append the token chosen in a step, with its details when the request asked for them."""
        self.tokens.append(token)
        self.ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if detail is not None:
            self.logprobs.append(detail.logprob)
            if self.params.top_n_tokens:
                self.top_tokens.append(detail.top[: self.params.top_n_tokens])

    def unrecord(self) -> None:
        """Take back the last token (the job ended before it)."""
        self.tokens.pop()
        self.ids.pop()
        if len(self.logprobs) > len(self.tokens):
            self.logprobs.pop()
        if len(self.top_tokens) > len(self.tokens):
            self.top_tokens.pop()

    def finish(self, reason: FinishReason | None = None, error: BaseException | None = None) -> None:
        """Mark the sequence done and wake whoever waits for it (only the first call counts)."""
        if self.done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self.finished_at = time.perf_counter()
        self.done.set()

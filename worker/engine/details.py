"""The details a request may ask for: each new token's log-probability and the most likely alternatives
(``details``, ``top_n_tokens``), each prompt token's log-probability (``decoder_input_details``), and how a
token appears in them. Log-probabilities are under the model's raw scores, whatever the sampling."""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.outputs import Details, Token
from worker.engine.scheduler import Planned
from worker.engine.sequence import Sequence, StepDetail

PROMPT_LOGPROB_ROWS = 256  # prompt positions turned into log-probabilities at a time (a float32 copy each)


class TokenDetails:
    """Tokens as the details show them: their own text (special tokens included) and log-probability."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def token(self, token: int, logprob: float | None) -> Token:
        """One token as the details show it."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return Token(id=token, text=text, logprob=logprob, special=token in self._special_ids)

    def of(self, seq: Sequence) -> Details:
        """The details of a finished sequence."""
        tokens = [self.token(t, lp) for t, lp in zip(seq.tokens, seq.logprobs, strict=False)]
        top = None
        if seq.params.top_n_tokens:
            top = [[self.token(t, lp) for t, lp in step] for step in seq.top_tokens[: len(seq.tokens)]]
        prefill = []
        if seq.params.decoder_input_details:
            prefill = [self.token(t, lp) for t, lp in zip(seq.prompt_ids, seq.prefill_logprobs, strict=False)]
        return Details(prefill=prefill, tokens=tokens, top_tokens=top)


def step_details(seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> dict[int, StepDetail]:
    """Log-probabilities (under the model's raw scores) of the chosen tokens, for the rows that ask."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.details]
    if not rows:
        return {}
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logprobs = logits.index_select(0, index).log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    top_n = max(seqs[row].params.top_n_tokens or 0 for row in rows)
    top: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if top_n:
        values, ids = logprobs.topk(top_n, dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return {row: StepDetail(lp, t) for row, lp, t in zip(rows, chosen, top, strict=True)}


def prompt_logprobs(item: Planned, logits: torch.Tensor) -> None:
    """Each prompt token's log-probability given the tokens before it (None for the first), from a
    chunk's logits: position ``p``'s scores give token ``p + 1``'s."""
    seq = item.seq
    if item.start == 0:
        seq.prefill_logprobs = [None]
    end = min(item.start + item.count, seq.prompt_len - 1)  # positions whose next token is a prompt token
    if end <= item.start:
        return
    targets = torch.tensor(seq.prompt_ids[item.start + 1 : end + 1], dtype=torch.long, device=logits.device)
    for offset in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        rows = logits[offset : offset + PROMPT_LOGPROB_ROWS][: len(targets) - offset].log_softmax(dim=-1)
        picked = rows.gather(1, targets[offset : offset + PROMPT_LOGPROB_ROWS].unsqueeze(1)).squeeze(1)
        seq.prefill_logprobs.extend(picked.tolist())

"""Choosing the next token of the rows that reached their end in a step: one sampler for all of them
(``worker.engine.sampling``), built again only when the set of rows changes, and the tokens each row holds (for
the repetition penalty), kept on the device and updated token by token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from worker.engine.sampling import TokenChooser
from worker.engine.sequence import Sequence


class BatchChooser:
    """The engine's sampler for the rows that choose in a step."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._chooser: tuple[tuple[Sequence, ...], TokenChooser] | None = None

    def seen(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """What the repetition penalty needs: ``[rows, vocab]`` bool, the tokens each row holds, when a
        row has a penalty (else a placeholder), and whether one has."""
        penalty = any(seq.sampling.repetition_penalty != 1.0 for seq in seqs)
        if not penalty:
            return logits.new_zeros((1, 1), dtype=torch.bool), False
        for seq in seqs:
            if seq.seen is None:
                seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.ids, dtype=torch.long, device=self.device)] = True
        return torch.stack([seq.seen for seq in seqs]), True  # type: ignore[misc]

    @contextlib.contextmanager
    def holding_eos(self, seqs: list[Sequence], logits: torch.Tensor, eos_ids: frozenset[int]) -> Iterator[None]:
        """While choosing, the end-of-text token cannot be chosen by rows short of their ``min_new_tokens``
        (its scores set to -inf, as transformers' ``MinNewTokensLengthLogitsProcessor`` does; with
        ``ignore_eos`` it is an ordinary token, as in vLLM); the raw scores are put back afterwards, for the
        log-probabilities the details report."""
        rows = [row for row, seq in enumerate(seqs) if len(seq.tokens) < seq.min_new_tokens and not seq.ignore_eos]
        if not rows or not eos_ids:
            yield
            return
        index = (torch.tensor(rows, device=logits.device).repeat_interleave(len(eos_ids)),
                 torch.tensor(sorted(eos_ids), device=logits.device).repeat(len(rows)))
        raw = logits[index]
        logits[index] = float("-inf")
        try:
            yield
        finally:
            logits[index] = raw

    def choose(self, seqs: list[Sequence], logits: torch.Tensor, seen: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token and whether its scores were unusable (see ``TokenChooser.choose``)."""
        try:
            return self._for(seqs).choose(logits, seen)
        except Exception:  # building the sampler or choosing: built afresh next time
            self._chooser = None
            raise

    def _for(self, seqs: list[Sequence]) -> TokenChooser:
        """The sampler for these rows, built again only when the set of rows changes."""
        # The cache holds the sequences themselves: an id() alone could be a finished sequence's, reused.
        cached = self._chooser
        if cached is None or len(cached[0]) != len(seqs) or any(a is not b for a, b in zip(cached[0], seqs, strict=True)):
            chooser = TokenChooser([s.sampling for s in seqs], self.device, [len(s.tokens) for s in seqs])
            self._chooser = cached = (tuple(seqs), chooser)
        return cached[1]

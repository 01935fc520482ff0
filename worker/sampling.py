"""Next-token choice for a batch whose rows each have their own parameters.

Every transform is a tensor op over the whole batch with per-row parameter tensors; the order and the
arithmetic follow transformers' ``generate`` (repetition penalty, then temperature, top-k, top-p and
typical-p for sampling rows), so a greedy row gives exactly the tokens ``model.generate`` gives.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jobs.schema import GenerateParameters

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RowSampling:
    """One request's decoding settings, resolved (seed chosen when sampling without one)."""

    do_sample: bool
    temperature: float
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    typical_p: float  # 1.0 = off
    repetition_penalty: float  # 1.0 = off
    seed: int | None

    @classmethod
    def from_parameters(cls, params: GenerateParameters) -> RowSampling:
        """Resolve request parameters; a sampling request without a seed gets a random one."""
        sampling = params.sampling
        seed = params.seed
        if sampling and seed is None:
            seed = secrets.randbits(63)
        return cls(
            do_sample=sampling,
            temperature=params.temperature if params.temperature else 1.0,
            top_k=params.top_k or 0,
            top_p=params.top_p if params.top_p is not None else 1.0,
            typical_p=params.typical_p if params.typical_p is not None else 1.0,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty is not None else 1.0,
            seed=seed,
        )

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A private random stream for this row, so its samples do not depend on its batch mates."""
        if not self.do_sample:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed or 0)
        return gen


class TokenChooser:
    """Per-row logits processing and token choice for a fixed set of rows."""

    def __init__(
        self,
        rows: Sequence[RowSampling],
        device: torch.device,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.device = device
        col = {"device": device, "dtype": torch.float32}
        self.penalty = torch.tensor([[r.repetition_penalty] for r in rows], **col)
        self.temperature = torch.tensor([[r.temperature] for r in rows], **col)
        self.top_k = torch.tensor([r.top_k for r in rows], device=device, dtype=torch.long)
        self.top_p = torch.tensor([[r.top_p] for r in rows], **col)
        self.typical_p = torch.tensor([[r.typical_p] for r in rows], **col)
        self.sample_mask = torch.tensor([r.do_sample for r in rows], device=device, dtype=torch.bool)
        # Generators belong to the requests (they carry each row's random stream across steps and
        # batches); fresh ones are made only when the caller has none.
        self.generators = list(generators) if generators is not None else [r.generator(device) for r in rows]
        # Which transforms apply, decided from the rows' Python values: asking the device tensors would
        # cost a host synchronisation per transform per step.
        self.any_penalty = any(r.repetition_penalty != 1.0 for r in rows)
        self.any_sample = any(r.do_sample for r in rows)
        self.any_top_k = any(r.top_k > 0 for r in rows)
        self.any_top_p = any(r.top_p < 1.0 for r in rows)
        self.any_typical = any(r.typical_p < 1.0 for r in rows)
        # The largest k any row keeps (a row without top_k keeps the whole vocabulary).
        self.largest_k = None if any(r.top_k <= 0 for r in rows) else max((r.top_k for r in rows), default=None)

    def choose(self, logits: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row, and which rows had no valid distribution to choose from.

        ``logits``: [rows, vocab] float32; ``seen``: [rows, vocab] bool. A row whose scores are NaN (or
        all infinite), or whose sampling distribution is not finite, is flagged ``invalid`` (its token is
        meaningless) instead of raising: the caller fails that row alone. The sampler itself never sees
        an invalid distribution, so ``torch.multinomial`` cannot raise (CPU) or assert (CUDA) on one.
        """
        scores = self._penalise(logits, seen) if self.any_penalty else logits
        invalid = torch.isnan(scores).any(dim=-1) | ~torch.isfinite(scores).any(dim=-1)
        greedy = scores.argmax(dim=-1)
        if not self.any_sample:
            return greedy, invalid
        probs = self._warp(scores).softmax(dim=-1)
        broken = ~(torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0))
        invalid = invalid | (self.sample_mask & broken)
        probs = torch.where(broken.unsqueeze(1), torch.ones_like(probs), probs)
        sampled = greedy.clone()
        for i, gen in enumerate(self.generators):
            # One draw per sampling row from its own generator: that is what makes a seeded job give
            # the same text alone or in any batch.
            if gen is not None:
                sampled[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return torch.where(self.sample_mask, sampled, greedy), invalid

    def _penalise(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        if self.any_top_k:
            scores = _top_k(scores, self.top_k, self.largest_k)
        if self.any_top_p:
            scores = _top_p(scores, self.top_p)
        if self.any_typical:
            scores = torch.where(self.typical_p < 1.0, _typical(scores, self.typical_p), scores)
        return scores


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, largest: int | None) -> torch.Tensor:
    vocab = scores.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    top_values = torch.topk(scores, vocab if largest is None else min(largest, vocab), dim=-1).values
    kth = top_values.gather(1, (k - 1).unsqueeze(1))
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - entropy)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    sorted_logits = scores.gather(-1, sorted_indices)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative < mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    remove_sorted = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)

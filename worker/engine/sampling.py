"""Next-token choice for a batch whose rows each have their own parameters.

Every transform is a tensor op over the rows that use it, with per-row parameter tensors; the order and
the arithmetic follow transformers' ``generate`` (repetition penalty, then temperature, top-k, top-p and
typical-p for sampling rows), so a greedy row gives exactly the tokens ``model.generate`` gives. Sampling
rows draw from a counter-based random stream of their own (seed, draw number), all in one computation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.params import SamplingParams

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
    def from_parameters(cls, params: SamplingParams) -> RowSampling:
        """Resolve request parameters; a sampling request without a seed gets a random one."""
        sampling = params.do_sample
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


MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), on int64 tensors holding values below 2**32."""
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    return (x >> 16) ^ x


def uniforms(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """One float64 in [0, 1) per row, a pure function of the row's seed and its draw number: a counter-based
    random stream, so a row's samples depend on nothing else (not its batch mates, not the device's
    random state), and all rows get theirs in one vectorised computation."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    a = _mix(_mix(low ^ _mix(draws & MASK32)) ^ high)
    b = _mix(_mix(high ^ _mix((draws + 0x632BE5AB) & MASK32)) ^ low)
    return (a.double() * 2.0**21 + (b >> 11).double()) / 2.0**53


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling for every row at once: the first token whose cumulative probability passes
    ``u`` × the row's total. A token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


class TokenChooser:
    """Per-row logits processing and token choice for a fixed set of rows.

    Only the sampling rows are warped and drawn from; each transform runs on the rows that use it (a
    full-vocabulary sort for ``top_p``/``typical_p`` rows only), and all sampling rows draw at once.
    ``draws``: how many tokens each row has drawn before (its position in its random stream); every
    ``choose`` moves every row on by one.
    """

    def __init__(self, rows: Sequence[RowSampling], device: torch.device, draws: Sequence[int] | None = None) -> None:
        self.rows = list(rows)
        self.device = device
        self.penalty = torch.tensor([[r.repetition_penalty] for r in rows], dtype=torch.float32, device=device)
        self.any_penalty = any(r.repetition_penalty != 1.0 for r in rows)
        # Which transforms apply, decided from the rows' Python values: asking the device tensors would
        # cost a host synchronisation per transform per step.
        sampling = [i for i, r in enumerate(rows) if r.do_sample]
        self.any_sample = bool(sampling)
        self.sample_rows = torch.tensor(sampling, dtype=torch.long, device=device)
        picked = [rows[i] for i in sampling]
        col = {"device": device, "dtype": torch.float32}
        self.temperature = torch.tensor([[r.temperature] for r in picked], **col)
        self.seeds = torch.tensor([(r.seed or 0) & (2**63 - 1) for r in picked], dtype=torch.long, device=device)
        offsets = [draws[i] for i in sampling] if draws is not None else [0] * len(picked)
        self.draws = torch.tensor(offsets, dtype=torch.long, device=device)
        # Per transform: the sampling rows (indexes among them) that use it, and their values.
        self._top_k = _subset([i for i, r in enumerate(picked) if r.top_k > 0],
                              [r.top_k for r in picked if r.top_k > 0], torch.long, device)
        self._top_p = _subset([i for i, r in enumerate(picked) if r.top_p < 1.0],
                              [[r.top_p] for r in picked if r.top_p < 1.0], torch.float32, device)
        self._typical = _subset([i for i, r in enumerate(picked) if r.typical_p < 1.0],
                                [[r.typical_p] for r in picked if r.typical_p < 1.0], torch.float32, device)
        self.largest_k = max((r.top_k for r in picked), default=0)

    def choose(self, logits: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row, and which rows had no valid distribution to choose from.

        ``logits``: [rows, vocab] float32; ``seen``: [rows, vocab] bool. A row whose scores are NaN (or
        all infinite), or whose sampling distribution is not finite, is flagged ``invalid`` (its token is
        meaningless) instead of raising: the caller fails that row alone. The sampler itself never sees
        an invalid distribution.
        """
        scores = self._penalise(logits, seen) if self.any_penalty else logits
        greedy = scores.argmax(dim=-1)
        # One pass over the scores: argmax takes NaN for the largest, so a row with a NaN, or with no
        # finite score (all -inf, or an +inf), has a best score that is not finite.
        invalid = ~torch.isfinite(scores.gather(1, greedy.unsqueeze(1)).squeeze(1))
        if not self.any_sample:
            return greedy, invalid
        rows = self.sample_rows
        probs = self._warp(scores.index_select(0, rows)).softmax(dim=-1)
        broken = ~(torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0))
        invalid = invalid.index_copy(0, rows, invalid.index_select(0, rows) | broken)
        probs = torch.where(broken.unsqueeze(1), torch.ones_like(probs), probs)
        picked = draw(probs, uniforms(self.seeds, self.draws))
        self.draws += 1
        return greedy.index_copy(0, rows, picked), invalid

    def _penalise(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p and typical-p on the sampling rows' scores, each on the rows using it."""
        scores = scores / self.temperature
        if self._top_k is not None:
            rows, k = self._top_k
            scores = scores.index_copy(0, rows, _top_k(scores.index_select(0, rows), k, self.largest_k))
        if self._top_p is not None:
            rows, p = self._top_p
            scores = scores.index_copy(0, rows, _top_p(scores.index_select(0, rows), p))
        if self._typical is not None:
            rows, mass = self._typical
            scores = scores.index_copy(0, rows, _typical(scores.index_select(0, rows), mass))
        return scores


def _subset(rows: list[int], values: list, dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows a transform applies to and their values, as device tensors; None when no row uses it."""
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(values, dtype=dtype, device=device))


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

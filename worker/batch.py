"""A batch of sequences decoding together: one object per request, tensors for the whole batch.

Layout (the TGI ``CausalLMBatch`` idea, for BLOOM in transformers 5):

- rows are **left-padded**: every row's newest token sits in the last column, so one decode step feeds
  one token per row and appends one column to the attention mask and the KV cache;
- the KV cache is a ``DynamicCache`` whose layers hold ``[batch, heads, length, head_dim]`` keys/values;
- ALiBi needs no position ids: BLOOM builds its bias from the 2-D attention mask (cumulative sum of the
  mask), so a row's real tokens keep positions 0..n-1 whatever padding sits to their left, and padded
  columns are masked out. That is what lets rows of different lengths share one cache.

A batch always holds the logits for every row's *next* token, so ``concatenate`` and ``filter`` can run
between steps without an extra forward pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from jobs.schema import FinishReason, GenerateParameters
from worker.kvcache import growing_cache, with_room
from worker.sampling import RowSampling, TokenChooser


@dataclass(frozen=True)
class StepDetail:
    """A row's chosen token's log-probability in one step, and the most likely tokens (best first)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Choice:
    """What one step chose: a token per row, the rows that could not choose (and why), and details for
    the rows that asked."""

    tokens: list[int]
    errors: dict[int, Exception]
    details: dict[int, StepDetail]


@dataclass(eq=False)
class Sequence:
    """One request's whole state: prompt, parameters, tokens so far, and how to hand back the result."""

    prompt: str
    params: GenerateParameters
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: RowSampling
    stop: list[str]
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with params.details: each new token's log-probability
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.top_n_tokens
    prefill_logprobs: list[float | None] = field(default_factory=list)  # with params.decoder_input_details
    text: str = ""
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    deadline: float | None = None  # time.perf_counter() value after which the sequence is stopped
    cancelled: bool = False  # set by another thread; the engine stops the sequence at its next step
    isolated: bool = False  # suspected of crashing a worker: runs alone, never batched with others
    rank: tuple[int, int] = (0, 0)  # (priority class, priority): lower is admitted first
    restarts: int = 0  # times the engine started it over from its prompt (after an out-of-memory, say)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still generate."""
        return self.max_new_tokens - len(self.tokens)

    def reset(self, device: torch.device) -> None:
        """Forget progress (the sequence will be prefilled again), reseeding its random stream."""
        self.restarts += 1
        self.tokens = []
        self.logprobs = []
        self.top_tokens = []
        self.text = ""
        self.finish_reason = None
        self.generator = self.sampling.generator(device)

    def record(self, token: int, detail: StepDetail | None) -> None:
        """Append the token chosen in a step, with its details when the request asked for them."""
        self.tokens.append(token)
        if detail is not None:
            self.logprobs.append(detail.logprob)
            if self.params.top_n_tokens:
                self.top_tokens.append(detail.top[: self.params.top_n_tokens])

    def unrecord(self) -> None:
        """Take back the last token (the job ended before it)."""
        self.tokens.pop()
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


class Batch:
    """Sequences decoding together, with their shared attention mask, KV cache and pending logits."""

    def __init__(
        self,
        seqs: list[Sequence],
        attention_mask: torch.Tensor,
        cache: Any,
        logits: torch.Tensor,
        seen: torch.Tensor,
    ) -> None:
        self.seqs = seqs
        self.attention_mask = attention_mask  # [B, L]
        self.cache = cache  # DynamicCache, [B, H, L, D] per layer
        self.logits = logits  # [B, V] float32: scores for each row's next token
        self.seen = seen  # [B, V] bool: tokens present in each row (repetition penalty)
        self.chooser = TokenChooser([s.sampling for s in seqs], logits.device, [s.generator for s in seqs])
        # Rows that asked for token details: only they pay for a log-softmax over the vocabulary.
        detail_rows = [row for row, seq in enumerate(seqs) if seq.params.details]
        self._detail_row_list = detail_rows  # the same rows as Python ints: no device read to name them
        self._detail_rows = torch.tensor(detail_rows, dtype=torch.long, device=logits.device) if detail_rows else None
        self._top_n = max((seq.params.top_n_tokens or 0 for seq in seqs), default=0)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        """Cache length (columns), padding included."""
        return int(self.attention_mask.shape[1])

    @classmethod
    def prefill(cls, model: Any, seqs: Seq[Sequence], pad_token_id: int, vocab_size: int) -> Batch:
        """Run the prompts of ``seqs`` through the model, left-padded to a common length."""
        device = model.device
        width = max(s.prompt_len for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, width - seq.prompt_len :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            attention_mask[row, width - seq.prompt_len :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        now = time.perf_counter()
        for seq in seqs:
            seq.started_at = seq.started_at or now  # model time includes the prefill
        # Prompt log-probabilities need the scores at every prompt position: only then all logits are kept.
        prompt_details = any(seq.params.decoder_input_details for seq in seqs)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=growing_cache(model.config),
            use_cache=True,
            logits_to_keep=0 if prompt_details else 1,
        )
        if prompt_details:
            for row, seq in enumerate(seqs):
                if seq.params.decoder_input_details:
                    seq.prefill_logprobs = _prompt_logprobs(out.logits[row], seq.prompt_ids, width)
        seen = torch.zeros((len(seqs), vocab_size), dtype=torch.bool, device=device)
        # Padding columns scatter into the pad id's slot with a 0 count, so they mark nothing as seen.
        counts = torch.zeros((len(seqs), vocab_size), dtype=torch.long, device=device)
        counts.scatter_add_(1, input_ids, attention_mask)
        seen |= counts > 0
        return cls(list(seqs), attention_mask, out.cache, out.logits[:, -1, :].float(), seen)

    def choose(self, invalid_error: Exception) -> Choice:
        """Pick every row's next token from the pending logits; rows with no valid distribution get
        ``invalid_error``."""
        tokens, invalid = self.chooser.choose(self.logits, self.seen)
        return self._chosen(tokens, invalid, {}, invalid_error)

    def choose_rows_alone(self, invalid_error: Exception) -> Choice:
        """Pick each row's token on its own, after choosing for the whole batch raised; the rows whose
        choice raises get that error."""
        device = self.logits.device
        tokens = torch.zeros(len(self.seqs), dtype=torch.long, device=device)
        invalid = torch.zeros(len(self.seqs), dtype=torch.bool, device=device)
        errors: dict[int, Exception] = {}
        for row, seq in enumerate(self.seqs):
            alone = TokenChooser([seq.sampling], device, [seq.generator])
            try:
                token, bad = alone.choose(self.logits[row : row + 1], self.seen[row : row + 1])
            except Exception as exc:  # this row's parameters or scores break the sampler
                errors[row] = exc
                invalid[row] = True
                continue
            tokens[row], invalid[row] = token[0], bad[0]
        return self._chosen(tokens, invalid, errors, invalid_error)

    def _chosen(
        self, tokens: torch.Tensor, invalid: torch.Tensor, errors: dict[int, Exception], invalid_error: Exception
    ) -> Choice:
        self.seen[torch.arange(len(self.seqs), device=tokens.device), tokens] = True
        self._last = tokens
        # One transfer from the device for both answers.
        values, flags = torch.stack([tokens, invalid.long()]).tolist()
        for row, flag in enumerate(flags):
            if flag:
                errors.setdefault(row, invalid_error)
        return Choice(values, errors, self._details(tokens))

    def _details(self, tokens: torch.Tensor) -> dict[int, StepDetail]:
        """Log-probabilities (under the model's raw scores) of the chosen tokens, for the rows that ask."""
        rows = self._detail_rows
        if rows is None:
            return {}
        logprobs = self.logits.index_select(0, rows).log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
        top: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if self._top_n:
            values, ids = logprobs.topk(self._top_n, dim=-1)
            top = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return {row: StepDetail(lp, t) for row, lp, t in zip(self._detail_row_list, chosen, top, strict=True)}

    def forward(self, model: Any) -> None:
        """Feed the tokens just chosen; afterwards ``logits`` hold the scores for the next ones.

        A forward that raises leaves the batch as it was before it (the cache's filled length and the
        attention mask are restored), so it can be tried again or probed row by row.
        """
        ones = self.attention_mask.new_ones((len(self.seqs), 1))
        mask = torch.cat([self.attention_mask, ones], dim=1)
        filled = [layer.filled for layer in self.cache.layers]
        try:
            out = model(input_ids=self._last.view(-1, 1), attention_mask=mask, cache=self.cache, use_cache=True)
        except BaseException:
            for layer, length in zip(self.cache.layers, filled, strict=True):
                layer.filled = length
            raise
        self.attention_mask = mask
        self.cache = out.cache
        self.logits = out.logits[:, -1, :].float()

    def rows_failing_alone(self, model: Any) -> dict[int, Exception]:
        """After a forward raised: run each row's step on its own (a copy of its cache) and return the
        rows that fail alone, with their errors. Slow, but only on this rare path."""
        failing: dict[int, Exception] = {}
        for row in range(len(self.seqs)):
            cache = growing_cache(model.config)
            for layer, source in zip(cache.layers, self.cache.layers, strict=True):
                layer.update(source.keys[row : row + 1].clone(), source.values[row : row + 1].clone())
            mask = F.pad(self.attention_mask[row : row + 1], (0, 1), value=1)
            try:
                model(input_ids=self._last[row : row + 1].view(1, 1), attention_mask=mask, cache=cache, use_cache=True)
            except Exception as exc:
                failing[row] = exc
        return failing

    def filter(self, keep: list[int]) -> Batch | None:
        """Keep only the rows at ``keep``.

        Rather than copying the whole cache into a smaller one (once per finished request, hundreds of
        MB for a big batch), the last rows are moved into the holes the finished ones leave, and every
        tensor is narrowed to the first ``len(keep)`` rows, which is a view. Row order changes.
        """
        if not keep:
            return None
        rows = len(keep)
        if rows == len(self.seqs):
            return self
        kept = set(keep)
        holes = [i for i in range(rows) if i not in kept]
        movers = [i for i in keep if i >= rows]
        device = self.attention_mask.device
        hole_index = torch.tensor(holes, dtype=torch.long, device=device)
        mover_index = torch.tensor(movers, dtype=torch.long, device=device)
        # (the cache layers move the indexes to their own device: with device_map they span GPUs)
        for layer in self.cache.layers:
            layer.keep_rows(hole_index, mover_index, rows)
        tensors = [self.attention_mask, self.logits, self.seen, self._last]
        for tensor in tensors:
            if holes:
                tensor.index_copy_(0, hole_index, tensor.index_select(0, mover_index))
        seqs = list(self.seqs[:rows])
        for hole, mover in zip(holes, movers, strict=True):
            seqs[hole] = self.seqs[mover]
        mask, logits, seen, last = (tensor[:rows] for tensor in tensors)
        # Columns that are padding for every remaining row (the prompt of a long job that left) are
        # dropped from the left; slicing the length dimension is a view too, so this copies nothing.
        first = int(mask.any(dim=0).long().argmax())
        if first:
            mask = mask[:, first:]
            for layer in self.cache.layers:
                layer.drop_left(first)
        batch = Batch(seqs, mask, self.cache, logits, seen)
        batch._last = last
        return batch

    @classmethod
    def concatenate(cls, batches: Seq[Batch]) -> Batch:
        """One batch from several, each left-padded to the longest cache."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.length for b in batches)
        masks = [F.pad(b.attention_mask, (width - b.length, 0)) for b in batches]
        seqs = [s for b in batches for s in b.seqs]
        cache = batches[0].cache
        for index, layer in enumerate(cache.layers):
            first_k = layer.keys
            shape = (len(seqs), first_k.shape[1], width, first_k.shape[3])
            new_k, new_v = with_room(shape, first_k), with_room(shape, layer.values)
            row = 0
            for b in batches:
                other = b.cache.layers[index]
                rows, offset = len(b), width - b.length
                # Left padding: zeros (masked out by the attention mask), then this batch's cache.
                new_k[row : row + rows, :, :offset].zero_()
                new_v[row : row + rows, :, :offset].zero_()
                new_k[row : row + rows, :, offset:width] = other.keys
                new_v[row : row + rows, :, offset:width] = other.values
                row += rows
            layer.replace(new_k, new_v, width)
        return cls(
            seqs,
            torch.cat(masks, dim=0),
            cache,
            torch.cat([b.logits for b in batches], dim=0),
            torch.cat([b.seen for b in batches], dim=0),
        )

    def peak_slots(self, extra: Seq[Sequence] = ()) -> int:
        """Upper bound on KV slots (rows x columns) this batch, plus ``extra`` joining now, will use."""
        rows = len(self.seqs) + len(extra)
        width = max([self.length, *(s.prompt_len for s in extra)])
        remaining = max([*(s.remaining for s in self.seqs), *(s.max_new_tokens for s in extra)])
        return rows * (width + remaining)


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], width: int) -> list[float | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first).

    ``logits``: [width, vocab] for one left-padded row; the prompt fills its last ``len(prompt_ids)``
    columns. Done in chunks so the float32 copy stays small.
    """
    start = width - len(prompt_ids)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)
    values: list[float | None] = [None]
    for offset in range(0, len(targets), 256):
        scores = logits[start + offset : start + offset + 256][: len(targets) - offset].float().log_softmax(dim=-1)
        values.extend(scores.gather(1, targets[offset : offset + 256].unsqueeze(1)).squeeze(1).tolist())
    return values


def peak_slots_alone(seqs: Seq[Sequence]) -> int:
    """KV slots a new batch of ``seqs`` would need at its peak."""
    if not seqs:
        return 0
    return len(seqs) * (max(s.prompt_len for s in seqs) + max(s.max_new_tokens for s in seqs))

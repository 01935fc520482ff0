"""The generation engine: iteration-level (continuous) batching over one loaded model, on a paged KV cache.

Callers (Celery task threads) ``submit`` requests; one engine thread owns the model and the device and
loops: admit waiting requests (``worker.scheduler``: blocks from the pool, cached prefixes shared), plan
the step (decoding rows one token each, prompts in chunks within the step's token budget), run one forward
pass over all of it (``worker.paged``), choose the next token of every row that reached its end
(``worker.sampling``), and retire the rows that finished (their blocks go back). A short request never
waits for a long one, a long prompt never stalls the rows already decoding, and a new request joins
between two steps without copying anything of the others.

What goes wrong is handled here too (``worker.faults`` says whose fault an error is): a row whose scores
or parameters break fails alone; a forward that raises is probed chunk by chunk and only the chunks that
fail alone fail; out of memory preempts half the rows (they keep their tokens) and lowers the row cap; a
fatal device error hands over to the process.

Knows nothing of Celery or Redis, so it is testable on its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from config.models import ModelSpec
from jobs.lengths import LengthError, check_lengths
from jobs.schema import FinishReason, GenerateParameters, GenerationDetails, JobOutput, TokenDetail
from worker.blocks import BlockPool
from worker.faults import (
    NON_FINITE,
    DeviceFault,
    GenerationError,
    OutOfMemory,
    RequestValidationError,
    is_fatal_device_error,
    out_of_memory,
    row_error,
)
from worker.loading import LoadedModel
from worker.memory import free_device_memory, kv_budget_bytes
from worker.paged import ALL, Chunk, PagedBloom, PagedKV
from worker.sampling import RowSampling, TokenChooser
from worker.scheduler import Planned, Scheduler
from worker.sequence import Sequence, StepDetail
from worker.sharding import shard_of
from worker.text import TextTracker

log = logging.getLogger(__name__)


CAP_RECOVERY_STEPS = 16  # successful steps per extra row, after an out-of-memory
# Times a sequence is preempted by failures it shares with others (out of memory) before it fails: enough
# for the halving to get from the largest batch down to one row.
MAX_RESTARTS = 8
BURST_WINDOWS = 10  # an idle engine waits for a burst at most this many quiet periods (BLOOMQ_BATCH_WAIT_MS)
FAILED = object()  # a chunk whose pass failed (its row is already retired or waiting again)
STEP_TOKENS = {"cuda": 512, "cpu": 128}
PROMPT_LOGPROB_ROWS = 256  # prompt positions turned into log-probabilities at a time (a float32 copy each)


@dataclass
class GenerationResult:
    """What one request produced."""

    output: JobOutput
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs (see the README's configuration table)."""

    max_batch_size: int = 32
    max_batch_slots: int | None = None  # KV token slots in the pool; None: derived from free memory
    max_wait_seconds: float = 0.0
    # Tokens one forward pass may take: every decoding row's one, then prompt chunks. None: STEP_TOKENS
    # for the device (a GPU's decode step is bound by memory, so a long chunk costs it little; a CPU's is
    # bound by compute, so a chunk of 512 stalls the decoding rows for several of their steps).
    step_tokens: int | None = None
    block_size: int = 16  # token slots per KV block
    prefix_caching: bool = True


def step_tokens(config: EngineConfig, device: torch.device) -> int:
    """Tokens one forward pass may take on ``device``."""
    return config.step_tokens or STEP_TOKENS.get(device.type, 512)


def pool_blocks(loaded: LoadedModel, spec: ModelSpec, config: EngineConfig) -> int:
    """Blocks in the KV pool: ``max_batch_slots`` tokens' worth, or what fits in the memory left (less
    the largest step's activations), at most twice what every row at full length needs (the rest of
    the pool is prefix cache). For one rank of a tensor-parallel group: what fits on this rank."""
    size = config.block_size
    if config.max_batch_slots:
        return max(1, config.max_batch_slots // size)
    model_config = loaded.model.config
    shard = shard_of(loaded.model)
    itemsize = torch.empty((), dtype=loaded.dtype).element_size()
    tokens = step_tokens(config, loaded.device)
    # One pass: the widest attention scores (this rank's heads, a chunk against a full context, float32),
    # the MLP's 4x hidden activations, and the logits kept (a row each, or a prompt-details chunk).
    activations = (shard.heads * tokens * spec.max_total_tokens * 4
                   + tokens * model_config.hidden_size * 8 * itemsize
                   + max(config.max_batch_size, tokens) * model_config.vocab_size * 4)
    per_block = PagedKV.bytes_per_block(model_config, size, loaded.dtype, shard.world)
    fits = (kv_budget_bytes(loaded.device) - activations) // per_block
    useful = 2 * config.max_batch_size * -(-spec.max_total_tokens // size)
    return max(1, min(int(fits), useful))


def paged_model(loaded: LoadedModel, spec: ModelSpec, config: EngineConfig, group: Any = None
                ) -> tuple[PagedKV, PagedBloom]:
    """The KV pool and the paged forward of ``loaded``. In a tensor-parallel group every rank calls
    this at start-up: the pool gets the number of blocks that fits on every rank."""
    blocks = pool_blocks(loaded, spec, config)
    if group is not None:
        blocks = group.smallest(blocks)
    kv = PagedKV(loaded.model.config, blocks, config.block_size, loaded.dtype, loaded.device,
                 shard_of(loaded.model))
    return kv, PagedBloom(loaded.model, kv, group)


class Engine:
    """Generates text for many requests at once with one loaded model (or one tensor-parallel group)."""

    def __init__(
        self,
        loaded: LoadedModel,
        spec: ModelSpec,
        config: EngineConfig | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        group: Any = None,
    ) -> None:
        """``group``: the tensor-parallel group this engine leads (rank 0), or None for one device."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.spec = spec
        self.config = config or EngineConfig()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        # generation_config may give one id or a list of them (any of which ends generation).
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self.step_tokens = step_tokens(self.config, self.device)
        self.kv, self.paged = paged_model(loaded, spec, self.config, group)
        self.vocab_size = self.paged.vocab_size
        blocks = self.kv.num_blocks
        self.pool = BlockPool(blocks, self.config.block_size)
        self.scheduler = Scheduler(self.pool, self.step_tokens, self.config.prefix_caching)
        self.max_slots = blocks * self.config.block_size  # KV token slots
        self.text = TextTracker(self.tokenizer)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._cap = self.config.max_batch_size  # lowered after an out-of-memory, restored when idle
        self._cap_ceiling = self.config.max_batch_size  # below the size that last ran out of memory
        self._chooser: tuple[tuple[Sequence, ...], TokenChooser] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward passes run (for tests and metrics)
        self.prefills = 0  # prompt chunks run (for benchmarks and metrics)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per step
        # Called (on the engine thread) when the device fails for good; the worker process then exits.
        self.on_fatal = on_fatal
        self.fatal_error: BaseException | None = None
        if group is not None and group.world > 1:
            self._ensure_running()  # the group's other ranks hear from it even before the first job

    # -- the caller's side -------------------------------------------------------------------------

    def memory_in_use(self) -> int:
        """Bytes of device memory allocated (GPU), or this process's resident memory (CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def take_batch_sizes(self) -> dict[int, int]:
        """Steps by rows in the step since the last call."""
        counts, self.batch_sizes = self.batch_sizes, collections.Counter()
        return dict(counts)

    @property
    def running(self) -> list[Sequence]:
        """The sequences holding a row now (a copy)."""
        return list(self.scheduler.running)

    @property
    def load(self) -> int:
        """Sequences running or waiting."""
        return len(self.scheduler.running) + len(self._waiting)

    @property
    def prefix_counters(self) -> dict[str, int]:
        """Prompt positions taken from the prefix cache, and computed, since the engine started."""
        return {"reused": self.scheduler.reused_tokens, "computed": self.scheduler.computed_tokens}

    def generate(self, prompt: str, params: GenerateParameters) -> GenerationResult:
        """Run one request to completion (blocking the calling thread, not the engine)."""
        seq = self.submit(prompt, params)
        seq.done.wait()
        return self.result(seq)

    def submit(
        self,
        prompt: str,
        params: GenerateParameters,
        timeout: float | None = None,
        isolated: bool = False,
        rank: tuple[int, int] = (0, 0),
    ) -> Sequence:
        """Validate and queue a request; the returned sequence's ``done`` is set when it finishes.

        ``timeout``: seconds from now after which the sequence is stopped (finish reason ``timeout``),
        keeping the text it has. ``isolated``: run it alone, never batched with another request (a
        request suspected of having crashed a worker). ``rank``: lower is admitted first (priority class,
        then priority).
        """
        if self.fatal_error is not None:
            raise DeviceFault(f"this worker's device failed and it is stopping: {self.fatal_error}")
        seq = self._prepare(prompt, params)
        seq.isolated = isolated
        seq.rank = rank
        if timeout is not None:
            seq.deadline = time.perf_counter() + timeout
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify_all()
        self._ensure_running()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the engine's next step (or before it starts), keeping its text so far."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def partial_text(self, seq: Sequence) -> str:
        """The text generated so far, safe to show while the sequence runs (see ``TextTracker.partial``)."""
        return TextTracker.partial(seq)

    def result(self, seq: Sequence) -> GenerationResult:
        """The finished sequence as a result, or its error raised."""
        if seq.error is not None:
            raise seq.error
        text = seq.text
        if seq.params.return_full_text:
            text = seq.prompt + text
        output = JobOutput(
            generated_text=text,
            generated_tokens=len(seq.tokens),
            finish_reason=seq.finish_reason,
            seed=seq.sampling.seed,
            prompt_tokens=seq.prompt_len,
            details=self._details(seq) if seq.params.details else None,
        )
        seconds = (seq.finished_at or time.perf_counter()) - (seq.started_at or seq.submitted_at)
        return GenerationResult(output, seq.prompt_len, seconds)

    def token_detail(self, token: int, logprob: float | None) -> TokenDetail:
        """A token as the details show it: its own text (special tokens included) and log-probability."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return TokenDetail(id=token, text=text, logprob=logprob, special=token in self._special_ids)

    def _details(self, seq: Sequence) -> GenerationDetails:
        tokens = [self.token_detail(t, lp) for t, lp in zip(seq.tokens, seq.logprobs, strict=False)]
        top = None
        if seq.params.top_n_tokens:
            top = [[self.token_detail(t, lp) for t, lp in step] for step in seq.top_tokens[: len(seq.tokens)]]
        prefill = []
        if seq.params.decoder_input_details:
            prefill = [self.token_detail(t, lp) for t, lp in zip(seq.prompt_ids, seq.prefill_logprobs, strict=False)]
        return GenerationDetails(prefill=prefill, tokens=tokens, top_tokens=top)

    def stop(self) -> None:
        """Stop the engine thread (requests still waiting are failed)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        """Stop, and give the KV pool's memory back (the engine cannot run again)."""
        self.stop()
        self.kv.keys.clear()
        self.kv.values.clear()
        free_device_memory(self.device)

    def _prepare(self, prompt: str, params: GenerateParameters) -> Sequence:
        prompt_ids = self.tokenizer(prompt).input_ids
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate :]
        try:
            max_new = check_lengths(self.spec, params, len(prompt_ids))
        except LengthError as exc:
            raise RequestValidationError(str(exc)) from None
        assert max_new is not None  # the prompt was counted
        sampling = RowSampling.from_parameters(params)
        return Sequence(
            prompt=prompt,
            params=params,
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new,
            sampling=sampling,
            stop=list(params.stop),
            eos_token_ids=self.eos_token_ids,
        )

    def _ensure_running(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="bloomq-engine", daemon=True)
                self._thread.start()

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit()
                    if not self.scheduler.running:
                        with self._cond:
                            if not self._waiting and not self._stopping.is_set():
                                self._cond.wait(timeout=0.5)
                        self.paged.idle()
                        continue
                    self._step()
                except Exception as exc:  # never leave callers waiting on a dead engine thread
                    seqs = self.running
                    for seq in seqs:
                        self.scheduler.release(seq)
                    if self._fatal(exc, seqs):
                        return
                    log.exception("engine iteration failed")
                    for seq in seqs:
                        seq.finish(error=GenerationError(f"engine error: {type(exc).__name__}: {exc}"))
        if self.fatal_error is None:
            self.paged.close()
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        for seq in pending + self.running:
            seq.finish(error=GenerationError("the worker is shutting down"))

    def _admit(self) -> None:
        """Give waiting sequences rows, most urgent first, while the row cap and the block pool allow."""
        with self._cond:
            for seq in [s for s in self._waiting if self._stop_reason(s) is not None]:
                self._waiting.remove(seq)
                seq.text = TextTracker.partial(seq)  # a preempted row may have tokens
                seq.finish(self._stop_reason(seq))
            if not self._waiting:
                return
            running = self.scheduler.running
            if any(s.isolated for s in running):
                return  # a suspect runs alone until it finishes
            if not running:
                self._cap = max(self._cap, 1)  # after a lone retry was ordered, admit it alone
                self._wait_for_batch_to_fill()
            # Most urgent first: interactive before batch, then by priority, then in order of arrival.
            for seq in sorted(self._waiting, key=lambda s: s.rank):
                if len(running) >= self._cap:
                    break
                if seq.isolated and running:
                    break  # it waits for an empty engine
                if self.scheduler.awaits_prefix(seq):
                    continue  # its prefix is being computed: admitted once it is cached, sharing it
                if not self.scheduler.admit(seq):
                    break  # in order: later requests wait rather than overtake
                self._waiting.remove(seq)
                seq.started_at = seq.started_at or time.perf_counter()  # model time includes the prefill
                if seq.isolated:
                    break

    def _wait_for_batch_to_fill(self) -> None:
        """With an idle engine, let a burst of requests start together: wait until none has arrived for
        ``max_wait_seconds`` (the burst is over), the batch is full, or ``BURST_WINDOWS`` such waits have
        passed since the first one arrived (a steady trickle does not hold the first one back for long)."""
        quiet = self.config.max_wait_seconds
        if quiet <= 0:
            return
        limit = self._waiting[0].submitted_at + quiet * BURST_WINDOWS
        while len(self._waiting) < self._cap and not self._stopping.is_set():
            now = time.perf_counter()
            until = min(self._waiting[-1].submitted_at + quiet, limit)
            if until <= now:
                return
            self._cond.wait(timeout=until - now)

    def _step(self) -> None:
        """Stop what must stop, plan, run one forward pass, choose, retire."""
        for seq in self.running:
            reason = self._stop_reason(seq)
            if reason is not None:
                self._retire(seq, reason)
        planned, preempted = self.scheduler.plan()
        if preempted:
            self._wait_again(preempted)
        if not planned:
            return
        self.batch_sizes[len(planned)] += 1
        if any(item.start < item.seq.prompt_len for item in planned):
            self.prefills += 1  # a pass that reads prompt tokens
        outputs = self._forward(planned)
        running = set(self.scheduler.running)
        ready: list[tuple[Planned, torch.Tensor]] = []
        for item, logits in zip(planned, outputs, strict=True):
            if logits is FAILED or item.seq.done.is_set() or item.seq not in running:
                continue
            self.scheduler.ran(item)
            if item.logits == ALL:
                self._prompt_logprobs(item, logits)
            if item.completes:
                ready.append((item, logits[-1]))
        if ready:
            self._choose(ready)
        if self._cap < self._cap_ceiling and self.steps % CAP_RECOVERY_STEPS == 0:
            self._cap += 1  # after an out-of-memory, grow back slowly while steps succeed
        if not self.scheduler.running:
            with self._cond:
                if not self._waiting:
                    self._cap = self._cap_ceiling = self.config.max_batch_size  # drained cleanly: full size

    def _forward(self, planned: list[Planned]) -> list[Any]:
        """One pass over the planned chunks: per chunk, its logits (None when it asked for none), or
        ``FAILED``. A pass that raises (not out of memory) is probed chunk by chunk: the chunks that fail
        alone fail their rows, the others' results are kept."""
        chunks = [Chunk(p.seq.ids[p.start : p.start + p.count], p.start, p.seq.table, p.logits) for p in planned]
        try:
            outputs = self.paged.forward(chunks)
            self.steps += 1
            return outputs
        except Exception as exc:
            if self._fatal(exc, self.running):
                return [FAILED] * len(planned)
            if out_of_memory(exc):
                self._out_of_memory([p.seq for p in planned], exc)
                return [FAILED] * len(planned)
            first = exc
        if len(planned) == 1:
            self._retire(planned[0].seq, error=row_error("running the model", first))
            return [FAILED]
        log.warning("a step of %d rows raised %s: %s; running each alone", len(planned), type(first).__name__, first)
        results: list[Any] = []
        for item, chunk in zip(planned, chunks, strict=True):
            try:
                [logits] = self.paged.forward([chunk])
            except Exception as alone:
                if self._fatal(alone, self.running):
                    return [FAILED] * len(planned)
                if out_of_memory(alone):
                    self._out_of_memory([item.seq], alone)
                else:
                    self._retire(item.seq, error=row_error("running the model", alone))
                results.append(FAILED)
                continue
            results.append(logits)
        self.steps += 1
        return results

    def _choose(self, ready: list[tuple[Planned, torch.Tensor]]) -> None:
        """Pick the next token of every row that reached its end, record it, and retire finished rows."""
        seqs = [item.seq for item, _ in ready]
        logits = torch.stack([row for _, row in ready])
        penalty = any(seq.sampling.repetition_penalty != 1.0 for seq in seqs)
        seen = self._seen(seqs) if penalty else logits.new_zeros((1, 1), dtype=torch.bool)
        errors: dict[int, Exception] = {}
        try:
            tokens, invalid = self._chooser_for(seqs).choose(logits, seen)
        except Exception as exc:  # building the sampler or choosing: a row's parameters or scores break it
            self._chooser = None
            if self._fatal(exc, self.running):
                return
            log.warning("choosing tokens for %d rows raised %s: %s; choosing row by row", len(seqs),
                        type(exc).__name__, exc)
            tokens, invalid, errors = self._choose_rows_alone(seqs, logits, seen, penalty)
        # One transfer from the device for both answers.
        values, flags = torch.stack([tokens, invalid.long()]).tolist()
        details = self._step_details(seqs, logits, tokens)
        for row, (seq, token, flag) in enumerate(zip(seqs, values, flags, strict=True)):
            if flag or row in errors:
                error = errors.get(row, NON_FINITE)
                self._retire(seq, error=row_error(f"choosing new token {len(seq.tokens) + 1}", error))
                continue
            seq.record(token, details.get(row))
            if seq.seen is not None:
                seq.seen[token] = True
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._retire(seq, reason)

    def _chooser_for(self, seqs: list[Sequence]) -> TokenChooser:
        """The sampler for these rows, built again only when the set of rows changes."""
        # The cache holds the sequences themselves: an id() alone could be a finished sequence's, reused.
        cached = self._chooser
        if cached is None or len(cached[0]) != len(seqs) or any(a is not b for a, b in zip(cached[0], seqs, strict=True)):
            chooser = TokenChooser([s.sampling for s in seqs], self.device, [len(s.tokens) for s in seqs])
            self._chooser = cached = (tuple(seqs), chooser)
        return cached[1]

    def _seen(self, seqs: list[Sequence]) -> torch.Tensor:
        """[rows, vocab] bool: the tokens each row holds (for the repetition penalty)."""
        for seq in seqs:
            if seq.seen is None:
                seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.ids, dtype=torch.long, device=self.device)] = True
        return torch.stack([seq.seen for seq in seqs])  # type: ignore[misc]

    def _choose_rows_alone(self, seqs: list[Sequence], logits: torch.Tensor, seen: torch.Tensor, penalty: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, dict[int, Exception]]:
        """Each row's token on its own, after choosing for all rows raised; the rows whose choice raises
        get that error."""
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        invalid = torch.zeros(len(seqs), dtype=torch.bool, device=self.device)
        errors: dict[int, Exception] = {}
        for row, seq in enumerate(seqs):
            try:
                alone = TokenChooser([seq.sampling], self.device, [len(seq.tokens)])
                token, bad = alone.choose(logits[row : row + 1], seen[row : row + 1] if penalty else seen)
            except Exception as exc:  # this row's parameters or scores break the sampler
                errors[row] = exc
                invalid[row] = True
                continue
            tokens[row], invalid[row] = token[0], bad[0]
        return tokens, invalid, errors

    def _step_details(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor
                      ) -> dict[int, StepDetail]:
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

    def _prompt_logprobs(self, item: Planned, logits: torch.Tensor) -> None:
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

    def _retire(self, seq: Sequence, reason: FinishReason | None = None, error: BaseException | None = None) -> None:
        """``seq`` is done: its blocks go back and its caller is told."""
        self.scheduler.release(seq)
        if error is None:
            if reason in (FinishReason.CANCELED, FinishReason.TIMEOUT):
                seq.text = TextTracker.partial(seq)
            else:
                seq.text = self.text.final(seq, cut_at_stop=reason is FinishReason.STOP_SEQUENCE)
        seq.finish(reason, error)

    def _wait_again(self, seqs: list[Sequence]) -> None:
        """Preempted rows wait for a row again, ahead of those that never ran (they keep their tokens)."""
        with self._cond:
            self._waiting.extendleft(reversed(seqs))

    def _out_of_memory(self, seqs: list[Sequence], exc: Exception) -> None:
        """Out of memory in a step: a row alone in the engine fails; otherwise the less urgent half of the
        rows gives its blocks back and waits (keeping its tokens), and the row cap drops below what failed.
        A row preempted ``MAX_RESTARTS`` times fails with the error."""
        free_device_memory(self.device)
        running = self.running
        self._cap_ceiling = max(1, min(self._cap_ceiling, len(running) - 1))
        if len(running) == 1:
            seq = running[0]
            log.warning("a request ran out of memory alone: %s", exc)
            self._retire(seq, error=OutOfMemory(
                f"out of device memory for this request alone ({seq.prompt_len} prompt tokens + "
                f"{seq.max_new_tokens} new): {exc}"))
            return
        self._cap = max(1, len(running) // 2)
        log.warning("out of memory with %d rows; retrying with at most %d", len(running), self._cap)
        ordered = sorted(running, key=lambda s: s.rank)
        giving_way = ordered[self._cap :] or [s for s in seqs if s in running][:1]
        again = []
        for seq in giving_way:
            self.scheduler.preempt(seq)
            if seq.preemptions > MAX_RESTARTS:
                seq.finish(error=OutOfMemory(f"gave up after giving way {seq.preemptions} times: out of device memory"))
            else:
                again.append(seq)
        self._wait_again(again)

    def _fatal(self, exc: BaseException, seqs: list[Sequence]) -> bool:
        """If ``exc`` left the device unusable: stop the engine and hand over to ``on_fatal`` (which
        exits the process; its jobs are requeued). True when it did."""
        if not is_fatal_device_error(exc):
            return False
        log.critical("fatal device error with %d requests running: %s: %s", len(seqs), type(exc).__name__, exc)
        self.fatal_error = exc
        self._stopping.set()
        if self.on_fatal is not None:
            self.on_fatal(exc)
        else:
            for seq in seqs:
                seq.finish(error=DeviceFault(f"the device failed: {exc}"))
        return True

    @staticmethod
    def _stop_reason(seq: Sequence) -> FinishReason | None:
        """Canceled or out of time: stop whatever the model says."""
        if seq.cancelled:
            return FinishReason.CANCELED
        if seq.deadline is not None and time.perf_counter() >= seq.deadline:
            return FinishReason.TIMEOUT
        return None

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        stopped = self._stop_reason(seq)
        if stopped is not None:
            seq.unrecord()  # the token chosen in this step is not kept: the job ended before it
            return stopped
        hit_stop = self.text.add(seq, token)
        if token in seq.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if hit_stop:
            return FinishReason.STOP_SEQUENCE
        if seq.remaining <= 0:
            return FinishReason.LENGTH
        return None

"""The generation engine: iteration-level (continuous) batching over one loaded model, on a paged KV cache.

Callers (Celery task threads) ``submit`` requests; one engine thread owns the model and the device and
loops: admit waiting requests (``worker.engine.waiting``, then ``worker.engine.scheduler``: blocks from the pool, cached
prefixes shared), plan the step (decoding rows one token each, prompts in chunks within the step's token
budget), run one forward pass over all of it (``worker.engine.paged``), choose the next token of every row that
reached its end (``worker.engine.choice``), and retire the rows that finished (their blocks go back; why a row
stops and the text it ends with: ``worker.engine.text``). A short request never waits for a long one, a long
prompt never stalls the rows already decoding, and a new request joins between two steps without copying
anything of the others.

What goes wrong is handled by the failure policy (``worker.engine.triage``): a row whose scores or parameters
break fails alone; a forward that raises is probed chunk by chunk; out of memory preempts half the rows
and lowers the row cap; a fatal device error hands over to the process.

Knows nothing of Celery or Redis, so it is testable on its own.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from config.lengths import LengthError, check_lengths
from config.models import ModelSpec
from worker.engine.blocks import BlockPool
from worker.engine.capacity import EngineConfig, paged_model, step_tokens
from worker.engine.choice import BatchChooser
from worker.engine.chunk import ALL, Chunk
from worker.engine.details import TokenDetails, prompt_logprobs, step_details
from worker.engine.faults import NON_FINITE, DeviceFault, GenerationError, RequestValidationError, row_error
from worker.engine.outputs import Completion, FinishReason, Token
from worker.engine.params import SamplingParams
from worker.engine.sampling import RowSampling
from worker.engine.scheduler import Planned, Scheduler
from worker.engine.sequence import Sequence
from worker.engine.text import TextTracker, stop_reason
from worker.engine.triage import FAILED, RowCap, Triage
from worker.engine.waiting import WaitingRoom
from worker.model.loading import LoadedModel
from worker.model.memory import free_device_memory, memory_in_use

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What one request produced."""

    output: Completion
    prompt_tokens: int
    seconds: float
    first_token_seconds: float | None = None  # from its submission here to its first token


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
        """``group``: the tensor-parallel group this engine leads (rank 0), or None for one device.
        ``on_fatal``: called (on the engine thread) when the device fails for good; the worker process
        then exits."""
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
        self.details = TokenDetails(self.tokenizer)
        self.step_tokens = step_tokens(self.config, self.device)
        self.kv, self.paged = paged_model(loaded, spec, self.config, group)
        self.vocab_size = self.paged.vocab_size
        blocks = self.kv.num_blocks
        self.pool = BlockPool(blocks, self.config.block_size)
        self.scheduler = Scheduler(self.pool, self.step_tokens, self.config.prefix_caching)
        self.max_slots = blocks * self.config.block_size  # KV token slots
        self.text = TextTracker(self.tokenizer)
        self.chooser = BatchChooser(self.vocab_size, self.device)
        self._stopping = threading.Event()
        self.waiting = WaitingRoom(self.config.max_wait_seconds, self._stopping)
        self.cap = RowCap(self.config.max_batch_size)
        self.triage = Triage(self.scheduler, self.cap, self.device, self._retire, self.waiting.put_back,
                             self._stopping, on_fatal)
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self.steps = 0  # forward passes run (for tests and metrics)
        self.prefills = 0  # prompt chunks run (for benchmarks and metrics)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per step
        if group is not None and group.world > 1:
            self._ensure_running()  # the group's other ranks hear from it even before the first job

    # -- the caller's side -------------------------------------------------------------------------

    def memory_in_use(self) -> int:
        """Bytes of device memory allocated (GPU), or this process's resident memory (CPU)."""
        return memory_in_use(self.device)

    def take_batch_sizes(self) -> dict[int, int]:
        """Steps by rows in the step since the last call."""
        counts, self.batch_sizes = self.batch_sizes, collections.Counter()
        return dict(counts)

    @property
    def fatal_error(self) -> BaseException | None:
        """The error that left the device unusable (the engine has stopped), if any."""
        return self.triage.fatal_error

    @property
    def running(self) -> list[Sequence]:
        """The sequences holding a row now (a copy)."""
        return list(self.scheduler.running)

    @property
    def load(self) -> int:
        """Sequences running or waiting."""
        return len(self.scheduler.running) + len(self.waiting)

    @property
    def prefix_counters(self) -> dict[str, int]:
        """Prompt positions taken from the prefix cache, and computed, since the engine started."""
        return {"reused": self.scheduler.reused_tokens, "computed": self.scheduler.computed_tokens}

    def generate(self, prompt: str, params: SamplingParams) -> GenerationResult:
        """Run one request to completion (blocking the calling thread, not the engine)."""
        seq = self.submit(prompt, params)
        seq.done.wait()
        return self.result(seq)

    def submit(
        self,
        prompt: str,
        params: SamplingParams,
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
        self.waiting.add(seq)
        self._ensure_running()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the engine's next step (or before it starts), keeping its text so far."""
        seq.cancelled = True
        self.waiting.wake()

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
        output = Completion(
            generated_text=text,
            generated_tokens=len(seq.tokens),
            finish_reason=seq.finish_reason,
            seed=seq.sampling.seed,
            prompt_tokens=seq.prompt_len,
            details=self.details.of(seq) if seq.params.details else None,
        )
        seconds = (seq.finished_at or time.perf_counter()) - (seq.started_at or seq.submitted_at)
        first = seq.first_token_at - seq.submitted_at if seq.first_token_at is not None else None
        return GenerationResult(output, seq.prompt_len, seconds, first)

    def token_detail(self, token: int, logprob: float | None) -> Token:
        """A token as the details show it: its own text (special tokens included) and log-probability."""
        return self.details.token(token, logprob)

    def stop(self) -> None:
        """Stop the engine thread (requests still waiting are failed)."""
        self._stopping.set()
        self.waiting.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        """Stop, and give the KV pool's memory back (the engine cannot run again)."""
        self.stop()
        self.kv.keys.clear()
        self.kv.values.clear()
        free_device_memory(self.device)

    def _prepare(self, prompt: str, params: SamplingParams) -> Sequence:
        prompt_ids = self.tokenizer(prompt).input_ids
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate :]
        try:
            max_new = check_lengths(self.spec, params.max_new_tokens, params.max_length, len(prompt_ids), params.min_new_tokens)
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
            min_new_tokens=params.min_new_tokens or 0,
            ignore_eos=params.ignore_eos,
        )

    def _ensure_running(self) -> None:
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="bloomq-engine", daemon=True)
                self._thread.start()

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self.waiting.admit(self.scheduler, self.cap)
                    if not self.scheduler.running:
                        self.waiting.idle()
                        self.paged.idle()
                        continue
                    self._step()
                except Exception as exc:  # never leave callers waiting on a dead engine thread
                    seqs = self.running
                    for seq in seqs:
                        self.scheduler.release(seq)
                    if self.triage.fatal(exc, seqs):
                        return
                    log.exception("engine iteration failed")
                    for seq in seqs:
                        seq.finish(error=GenerationError(f"engine error: {type(exc).__name__}: {exc}"))
        if self.fatal_error is None:
            self.paged.close()
        for seq in self.waiting.drain() + self.running:
            seq.finish(error=GenerationError("the worker is shutting down"))

    def _step(self) -> None:
        """Stop what must stop, plan, run one forward pass, choose, retire."""
        for seq in self.running:
            reason = stop_reason(seq)
            if reason is not None:
                self._retire(seq, reason)
        planned, preempted = self.scheduler.plan()
        if preempted:
            self.waiting.put_back(preempted)
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
                prompt_logprobs(item, logits)
            if item.completes:
                ready.append((item, logits[-1]))
        if ready:
            self._choose(ready)
        self.cap.stepped(self.steps)
        if not self.scheduler.running and self.waiting.empty():
            self.cap.restore()

    def _forward(self, planned: list[Planned]) -> list[Any]:
        """One pass over the planned chunks: per chunk, its logits (None when it asked for none), or
        ``FAILED``. A pass that raises is left to the failure policy (``worker.engine.triage``)."""
        chunks = [Chunk(p.seq.ids[p.start : p.start + p.count], p.start, p.seq.table, p.logits) for p in planned]
        try:
            outputs = self.paged.forward(chunks)
            self.steps += 1
            return outputs
        except Exception as exc:
            if self.triage.lost_step(exc, planned):
                return [FAILED] * len(planned)
            first = exc
        probed = self.triage.probe(first, planned, chunks, self.paged.forward)
        if probed is None:
            return [FAILED] * len(planned)
        self.steps += 1
        return probed

    def _choose(self, ready: list[tuple[Planned, torch.Tensor]]) -> None:
        """Pick the next token of every row that reached its end, record it, and retire finished rows."""
        seqs = [item.seq for item, _ in ready]
        logits = torch.stack([row for _, row in ready])
        seen, penalty = self.chooser.seen(seqs, logits)
        errors: dict[int, Exception] = {}
        with self.chooser.holding_eos(seqs, logits, self.eos_token_ids):
            try:
                tokens, invalid = self.chooser.choose(seqs, logits, seen)
            except Exception as exc:  # building the sampler or choosing: a row's parameters or scores break it
                alone = self.triage.choose_rows_alone(exc, seqs, logits, seen, penalty)
                if alone is None:
                    return
                tokens, invalid, errors = alone
        # One transfer from the device for both answers.
        values, flags = torch.stack([tokens, invalid.long()]).tolist()
        details = step_details(seqs, logits, tokens)
        for row, (seq, token, flag) in enumerate(zip(seqs, values, flags, strict=True)):
            if flag or row in errors:
                error = errors.get(row, NON_FINITE)
                self._retire(seq, error=row_error(f"choosing new token {len(seq.tokens) + 1}", error))
                continue
            seq.record(token, details.get(row))
            if seq.seen is not None:
                seq.seen[token] = True
            reason = self.text.finish_reason(seq, token)
            if reason is not None:
                self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: FinishReason | None = None, error: BaseException | None = None) -> None:
        """``seq`` is done: its blocks go back and its caller is told. A failed row's own blocks are cleared
        first under FlexAttention, whose kernel reads past a row's end with a weight of zero: a NaN left
        there would reach the rows that get those blocks next (the gathering path never reads them)."""
        if error is not None and self.paged.attention == "flex":
            self.kv.zero(self.pool.discard(seq.table))
        self.scheduler.release(seq)
        if error is None:
            seq.text = self.text.ending(seq, reason)
        seq.finish(reason, error)

"""The generation engine: iteration-level (continuous) batching over one loaded model.

Callers (Celery task threads) ``submit`` requests; one engine thread owns the model and the device and
loops: admit waiting requests (prefill them, merge them into the running batch), choose every row's next
token, retire finished rows (filter the batch), run one decode step. A short request never waits for a
long one, and a new one joins between two steps.

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

import torch

from config.models import ModelSpec
from jobs.lengths import LengthError, check_lengths
from jobs.schema import FinishReason, GenerateParameters, GenerationDetails, JobOutput, TokenDetail
from worker.batch import Batch, Sequence, peak_slots_alone
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
from worker.memory import default_slot_budget, free_device_memory
from worker.loading import LoadedModel
from worker.sampling import RowSampling

log = logging.getLogger(__name__)


CAP_RECOVERY_STEPS = 16  # successful decode steps per extra batch row, after an out-of-memory
# Times a sequence is started over (after failures it shares with others: out of memory, a failed merge)
# before it fails: enough for the halving retry to get from the largest batch down to one row.
MAX_RESTARTS = 8
BURST_WINDOWS = 10  # an idle engine waits for a burst at most this many quiet periods (BLOOMQ_BATCH_WAIT_MS)

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
    max_batch_slots: int | None = None  # KV slots (rows x cache columns); None: derived from free memory
    max_wait_seconds: float = 0.0


class Engine:
    """Generates text for many requests at once with one loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        spec: ModelSpec,
        config: EngineConfig | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
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
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.tokenizer.pad_token_id or 0)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self.max_slots = self.config.max_batch_slots or default_slot_budget(self.model, self.device)
        self.batch: Batch | None = None
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._cap = self.config.max_batch_size  # lowered after an out-of-memory, restored when idle
        self._cap_ceiling = self.config.max_batch_size  # below the size that last ran out of memory
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)
        self.prefills = 0  # prefill passes run: groups of new requests joining (for benchmarks and metrics)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        # Called (on the engine thread) when the device fails for good; the worker process then exits.
        self.on_fatal = on_fatal
        self.fatal_error: BaseException | None = None

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
        """Decode steps by batch size since the last call."""
        counts, self.batch_sizes = self.batch_sizes, collections.Counter()
        return dict(counts)

    @property
    def load(self) -> int:
        """Sequences in the batch or waiting for it."""
        batch = self.batch  # the engine thread may replace it meanwhile
        return (len(batch) if batch is not None else 0) + len(self._waiting)

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
        """The text generated so far, safe to show while the sequence runs.

        Holds back an incomplete UTF-8 character at the end, and enough characters to hide a stop
        sequence that may be only partly generated yet.
        """
        text = self.tokenizer.decode(list(seq.tokens), skip_special_tokens=True)
        if seq.stop:
            cut = _first_stop(text, seq.stop)
            if cut is not None:
                return text[:cut]
            text = text[: max(0, len(text) - (max(len(s) for s in seq.stop) - 1))]
        return text.rstrip("\ufffd")

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
            generator=sampling.generator(self.device),
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
                    if self.batch is None:
                        with self._cond:
                            if not self._waiting and not self._stopping.is_set():
                                self._cond.wait(timeout=0.5)
                        continue
                    self._step()
                except Exception as exc:  # never leave callers waiting on a dead engine thread
                    seqs, self.batch = (self.batch.seqs if self.batch else []), None
                    if self._fatal(exc, seqs):
                        return
                    log.exception("engine iteration failed")
                    for seq in seqs:
                        seq.finish(error=GenerationError(f"engine error: {type(exc).__name__}: {exc}"))
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        for seq in pending + (self.batch.seqs if self.batch else []):
            seq.finish(error=GenerationError("the worker is shutting down"))

    def _admit(self) -> None:
        """Move waiting sequences into the batch, as many as the batch size and memory budget allow."""
        with self._cond:
            for seq in [s for s in self._waiting if self._stop_reason(s) is not None]:
                self._waiting.remove(seq)
                seq.finish(self._stop_reason(seq))
            if not self._waiting:
                return
            if self.batch is not None and any(s.isolated for s in self.batch.seqs):
                return  # a suspect runs alone until it finishes
            if self.batch is None:
                self._cap = max(self._cap, 1)  # after a lone retry was ordered, admit it alone
                self._wait_for_batch_to_fill()
            running = len(self.batch) if self.batch is not None else 0
            picked: list[Sequence] = []
            # Most urgent first: interactive before batch, then by priority, then in order of arrival.
            for seq in sorted(self._waiting, key=lambda s: s.rank):
                if running + len(picked) >= self._cap:
                    break
                candidate = [*picked, seq]
                if seq.isolated and (running or picked):
                    break  # it waits for an empty engine
                if self.batch is not None:
                    slots = self.batch.peak_slots(candidate)
                else:
                    slots = peak_slots_alone(candidate)
                if slots > self.max_slots and (self.batch is not None or picked):
                    break  # in order: later requests wait rather than overtake
                picked.append(seq)
                if seq.isolated:
                    break
            for seq in picked:
                self._waiting.remove(seq)
        if picked:
            self._prefill(picked)

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

    def _prefill(self, seqs: list[Sequence]) -> None:
        self.prefills += 1
        try:
            new = Batch.prefill(self.model, seqs, self.pad_token_id, self.vocab_size)
        except Exception as exc:
            if self._fatal(exc, seqs + (self.batch.seqs if self.batch else [])):
                return
            if out_of_memory(exc):
                self._recover(seqs, exc)  # retry smaller, then fail alone
                return
            new = self._prefill_apart(seqs, exc)  # find the request(s) at fault; the others go on
            if new is None:
                return
        if self.batch is None:
            self.batch = new
            return
        try:
            # Merging copies the whole cache: it can run out of memory too. A failure part-way leaves the
            # running batch's cache unusable, so every sequence involved starts again.
            self.batch = Batch.concatenate([self.batch, new])
        except Exception as exc:
            running, self.batch = self.batch.seqs, None
            if not self._fatal(exc, running + new.seqs):
                self._recover(running + new.seqs, exc)

    def _prefill_apart(self, seqs: list[Sequence], exc: Exception) -> Batch | None:
        """A group's prefill raised (not out of memory): prefill each request alone, fail the ones that
        fail alone, and return the others as one batch (None when none is left)."""
        if len(seqs) == 1:
            seqs[0].finish(error=row_error("reading the prompt", exc))
            return None
        log.warning("prefill of %d requests raised %s: %s; trying each alone", len(seqs), type(exc).__name__, exc)
        batches = []
        for seq in seqs:
            try:
                batches.append(Batch.prefill(self.model, [seq], self.pad_token_id, self.vocab_size))
            except Exception as alone:
                if self._fatal(alone, seqs):
                    return None
                if out_of_memory(alone):
                    self._recover([seq], alone)
                    continue
                seq.finish(error=row_error("reading the prompt", alone))
        return Batch.concatenate(batches) if batches else None

    def _step(self) -> None:
        """Choose, retire, decode: one token for every row."""
        batch = self.batch
        assert batch is not None
        self.batch_sizes[len(batch)] += 1
        try:
            choice = batch.choose(NON_FINITE)
        except Exception as exc:
            if self._fatal(exc, batch.seqs):
                self.batch = None
                return
            if out_of_memory(exc):
                self.batch = None
                self._recover(batch.seqs, exc)
                return
            log.warning("choosing tokens for %d rows raised %s: %s; choosing row by row", len(batch),
                        type(exc).__name__, exc)
            choice = batch.choose_rows_alone(NON_FINITE)
        keep = []
        for row, (seq, token) in enumerate(zip(batch.seqs, choice.tokens, strict=True)):
            if row in choice.errors:
                seq.finish(error=row_error(f"choosing new token {len(seq.tokens) + 1}", choice.errors[row]))
                continue
            seq.record(token, choice.details.get(row))
            reason = self._finish_reason(seq, token)
            if reason is None:
                keep.append(row)
            else:
                seq.text = self._final_text(seq, reason)
                seq.finish(reason)
        try:
            self.batch = batch.filter(keep)
        except Exception as exc:
            self.batch = None
            if not self._fatal(exc, [batch.seqs[row] for row in keep]):
                self._recover([batch.seqs[row] for row in keep], exc)
            return
        if self.batch is None:
            with self._cond:
                if not self._waiting:
                    # drained cleanly: full size again
                    self._cap = self._cap_ceiling = self.config.max_batch_size
            return
        self._forward()
        if self._cap < self._cap_ceiling and self.steps % CAP_RECOVERY_STEPS == 0:
            self._cap += 1  # after an out-of-memory, grow back slowly while steps succeed

    def _forward(self) -> None:
        """One decode step for the batch. A step that raises (not out of memory) is probed row by row:
        the rows that fail alone fail, the others take their step without starting over."""
        batch = self.batch
        assert batch is not None
        try:
            batch.forward(self.model)
            self.steps += 1
            return
        except Exception as exc:
            if self._fatal(exc, batch.seqs):
                self.batch = None
                return
            first = exc
        if not out_of_memory(first) and len(batch) > 1:
            failing = batch.rows_failing_alone(self.model)
            if failing and len(failing) < len(batch):
                for row, exc in failing.items():
                    batch.seqs[row].finish(error=row_error("running the model", exc))
                survivors = batch.filter([row for row in range(len(batch)) if row not in failing])
                assert survivors is not None
                self.batch = survivors
                try:
                    survivors.forward(self.model)
                    self.steps += 1
                    return
                except Exception as exc:
                    first, batch = exc, survivors
        self.batch = None
        if not self._fatal(first, batch.seqs):
            self._recover(batch.seqs, first)

    def _fatal(self, exc: BaseException, seqs: list[Sequence]) -> bool:
        """If ``exc`` left the device unusable: stop the engine and hand over to ``on_fatal`` (which
        exits the process; its jobs are requeued). True when it did."""
        if not is_fatal_device_error(exc):
            return False
        log.critical("fatal device error with %d requests in the batch: %s: %s", len(seqs), type(exc).__name__, exc)
        self.fatal_error = exc
        self._stopping.set()
        if self.on_fatal is not None:
            self.on_fatal(exc)
        else:
            for seq in seqs:
                seq.finish(error=DeviceFault(f"the device failed: {exc}"))
        return True

    def _recover(self, seqs: list[Sequence], exc: Exception) -> None:
        """After a failure that cannot be pinned on one request (out of memory, a failed merge): a lone
        sequence fails; a group goes back to be retried in halves. Each sequence starts over at most
        ``MAX_RESTARTS`` times, then fails with the error."""
        oom = out_of_memory(exc)
        if oom:
            free_device_memory(self.device)
            rows = len(seqs) + (len(self.batch) if self.batch else 0)
            self._cap_ceiling = max(1, min(self._cap_ceiling, rows - 1))
        if len(seqs) == 1 and self.batch is None:
            seq = seqs[0]
            log.warning("a request failed alone: %s: %s", type(exc).__name__, exc)
            if oom:
                error: BaseException = OutOfMemory(
                    f"out of device memory for this request alone ({seq.prompt_len} prompt tokens + "
                    f"{seq.max_new_tokens} new): {exc}"
                )
            else:
                error = row_error("generating", exc)
            seq.finish(error=error)
            return
        retry = []
        for seq in seqs:
            if seq.restarts >= MAX_RESTARTS:
                kind = "out of device memory" if oom else f"{type(exc).__name__}: {exc}"
                error = OutOfMemory if oom else GenerationError
                seq.finish(error=error(f"gave up after starting over {seq.restarts} times: {kind}"))
            else:
                retry.append(seq)
        if not retry:
            return
        # Retry with half as many rows at a time; a sequence restarts from its prompt (a greedy one gives
        # the same tokens again, a sampled one replays its seed).
        self._cap = max(1, (len(retry) + (len(self.batch) if self.batch else 0)) // 2)
        log.warning("%s with %d rows; retrying with at most %d", type(exc).__name__, len(retry), self._cap)
        if len(retry) == 1:
            self._cap = 0  # admit nothing until the running batch drains, then retry it alone
        for seq in retry:
            seq.reset(self.device)
        with self._cond:
            self._waiting.extendleft(reversed(retry))

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
        if token in seq.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if seq.stop:
            seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            if _first_stop(seq.text, seq.stop) is not None:
                return FinishReason.STOP_SEQUENCE
        if seq.remaining <= 0:
            return FinishReason.LENGTH
        return None

    def _final_text(self, seq: Sequence, reason: FinishReason) -> str:
        if reason in (FinishReason.CANCELED, FinishReason.TIMEOUT):
            return self.partial_text(seq)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if reason is FinishReason.STOP_SEQUENCE:
            cut = _first_stop(text, seq.stop)
            if cut is not None:
                text = text[:cut]
        return text


def _first_stop(text: str, stops: list[str]) -> int | None:
    """The index where the earliest stop sequence begins in ``text``, if any."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

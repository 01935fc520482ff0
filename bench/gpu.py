"""GPU benchmark: the stack on a real GPU, and the engine's decode step against the memory-bandwidth floor.

    make bench-gpu                              # or: python bench/gpu.py [--models bloom-560m,bloom-1b7] [--out FILE]
    python bench/gpu.py --device cpu --quick    # the rehearsal `make test` runs: tiny shapes, seconds

1. Stack: ``python -m worker --gpus all --dry-run`` (its plan), then a redis-server and one real worker; one
   job goes through the job store and Celery (no web) and the worker's announcement (device, dtype) is read.
2. Engine alone, on random-init checkpoints of real BLOOM shapes (built once into ``--cache``): greedy decode
   at each batch size, timed at the start of each forward call (the engine's paged pass, HF's model call;
   the interval between the starts of successive decode calls is one whole step, forward + token choice +
   bookkeeping), against the
   floor = (parameter bytes + KV cache bytes read in that step) / the card's measured copy bandwidth.
   HF ``generate`` is timed the same way at the same shapes. Then mixed lengths: continuous batching
   against static batches of HF ``generate``.
3. Prefill through the engine (prompts in chunks of its step token budget, prefix caching off so every
   prompt is computed) at several prompt lengths; peak memory against the engine's KV pool.
4. (CUDA, not --quick) Tensor-parallel and quantized decode on the first model: bench/parallel.py's rows for
   each tensor-parallel size the visible GPUs allow, and int8 / int4 weights on one GPU, at batch 1, 8, 32,
   against the floor of the bytes each rank reads.
5. (CUDA, not --quick) The engine benchmark's rows on the GPU (bench/engine.py, run as its own program, bf16):
   FlexAttention against gathering per pass; a long prompt joining running jobs (token gaps); 24 jobs sharing
   a prefix against distinct prompts; KV slots in use on the mixed workload; each engine part once with
   FlexAttention (the GPU default) and once gathering.

On a GPU machine with torch and transformers but no network, carry in:

    pip download -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        'celery[redis]>=5.5,<6' 'redis>=5.0' 'pydantic>=2.7,<3' requests python-json-logger setuptools
    apt-get download redis-server redis-tools libjemalloc2 liblzf1 libatomic1   # Debian 12's (binary: redis-tools)

and there run:

    pip install --no-index --find-links wheels 'celery[redis]' redis pydantic requests python-json-logger
    pip install --no-deps --no-build-isolation -e .       # optional: the script also runs from the checkout
    for deb in *.deb; do dpkg -x "$deb" redis-root; done
    python bench/gpu.py --redis-server redis-root/usr/bin/redis-server --out gpu.md

A checkpoint costs 4 bytes per parameter on disk (fp32) and is loaded in bf16. Tables are printed, written to
``--out``, and (CUDA runs, not ``--quick``) appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import torch  # noqa: E402

from bench.common import PROMPTS, STACK_DEFAULTS, machine, report, summarise  # noqa: E402
from config.models import ModelSpec, resolve_model  # noqa: E402
from config.settings import Settings  # noqa: E402
from worker.engine.capacity import EngineConfig  # noqa: E402
from worker.engine.core import Engine  # noqa: E402
from worker.engine.paged import PagedKV  # noqa: E402
from worker.engine.params import SamplingParams  # noqa: E402
from worker.engine.sequence import Sequence  # noqa: E402
from worker.model.loading import LoadedModel, load_model, pick_device  # noqa: E402

LOGS = ROOT / "test-artifacts" / "bench-gpu"
MIB = 2**20
# (hidden size, layers, heads, vocabulary); the vocabulary None is the tiny tokenizer's own.
SHAPES: dict[str, tuple[int, int, int, int | None]] = {
    "tiny": (64, 2, 4, None),
    "bloom-560m": (1024, 24, 16, 250880),
    "bloom-1b7": (2048, 24, 16, 250880),
    "bloom-7b1": (4096, 30, 32, 250880),
}
FLOOR_GOAL_MODELS = ("bloom-1b7", "bloom-7b1")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    batches: tuple[int, ...]
    prompt_tokens: int  # decode runs: every row has this prompt
    new_tokens: int  # decode runs: every row generates this many
    mixed_jobs: int
    mixed_new: tuple[int, int]  # new tokens drawn from this range (seed 1234)
    mixed_batch: int  # the engine's max batch size and the static batches' size
    prefill_lengths: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    copy_mib: int  # the tensor copied to measure bandwidth


FULL = Sizes((1, 8, 32, 64, 128), 128, 64, 64, (16, 256), 16, (128, 512, 1024), (1, 8), 1024)
QUICK = Sizes((1, 4), 8, 8, 8, (2, 8), 4, (16, 32), (1, 4), 64)


def build_checkpoint(cache: Path, shape: str) -> Path:
    """A random-init BLOOM of ``shape`` (built once; the tokenizer is written last, so it marks a whole one)."""
    out = cache / f"bench-{shape}"
    if (out / "tokenizer.json").exists():
        return out
    from worker.model.tiny import build_tiny_bloom

    hidden, layers, heads, vocab = SHAPES[shape]
    print(f"building a random {shape}-shaped checkpoint in {out} (once)", flush=True)
    return build_tiny_bloom(out, hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
                            init_std=0.02, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> str:
    """Peak allocated device memory since the last reset (a CPU run has no per-call figure)."""
    return f"{torch.cuda.max_memory_allocated(device) / MIB:.0f}" if device.type == "cuda" else "n/a"


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second one ``copy_`` moves (each byte read once and written once)."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - start)


@dataclasses.dataclass
class Steps:
    """Decode steps as timed from outside: seconds per step, mean rows, mean KV slots (rows x columns)."""

    seconds: float
    rows: float
    slots: float


class ForwardClock:
    """Notes when each forward call starts, with its shape: HF's model calls (a pre-hook) and the engine's
    paged passes (``watch``), on the same clock.

    Both wait for the previous step's tokens before the next call (the chosen ids are read back), so the
    interval between two decode calls is one whole step, device work included.
    """

    def __init__(self, model: Any) -> None:
        self.calls: list[tuple[float, int, int, float]] = []  # (start, rows, most tokens fed to a row, mean context)
        self._handle = model.register_forward_pre_hook(self._note, with_kwargs=True)

    def _note(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        columns = mask.shape[1] if mask is not None else ids.shape[1]
        self.calls.append((time.perf_counter(), ids.shape[0], ids.shape[1], columns))

    def watch(self, engine: Engine) -> None:
        """Note the engine's passes too: rows = chunks, context = the positions each row attends to."""
        forward = engine.paged.forward

        def noted(chunks: list[Any]) -> Any:
            self.calls.append((time.perf_counter(), len(chunks), max(len(c.tokens) for c in chunks),
                               statistics.mean(c.end for c in chunks)))
            return forward(chunks)

        engine.paged.forward = noted

    def decode_steps(self, skip: int = 2) -> Steps:
        """The decode calls since the last ``clear``, after the first ``skip`` (warming up)."""
        decode = [call for call in self.calls if call[2] == 1][skip:]
        assert len(decode) >= 2, f"too few decode steps to time ({len(decode)})"
        timed = decode[:-1]
        return Steps(seconds=(decode[-1][0] - decode[0][0]) / len(timed),
                     rows=statistics.mean(c[1] for c in timed), slots=statistics.mean(c[1] * c[3] for c in timed))

    def clear(self) -> None:
        self.calls = []

    def close(self) -> None:
        self._handle.remove()


class Bench:
    """One loaded model and what is measured on it."""

    def __init__(self, loaded: LoadedModel, spec: ModelSpec, sizes: Sizes, bandwidth: float) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.spec = spec
        self.sizes = sizes
        self.bandwidth = bandwidth
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied head once
        self.kv_slot_bytes = PagedKV.bytes_per_block(self.model.config, 1, loaded.dtype)  # one token, all layers
        self.clock = ForwardClock(self.model)
        # Read right after loading, as a worker's engine would: the KV pool it sizes (then given back).
        first = Engine(loaded, spec)
        self.budget_slots = first.max_slots
        first.close()
        # One long text; a run takes its last n tokens (the engine through ``truncate``): both paths see the same ids.
        one = " ".join(PROMPTS) + " "
        longest = max(sizes.prompt_tokens, *sizes.prefill_lengths)
        self.text = one * (longest // len(loaded.tokenizer(one).input_ids) + 2)
        self.prompt_ids = loaded.tokenizer(self.text).input_ids

    def engine(self, max_batch_size: int, wait_seconds: float, prefix_caching: bool = True) -> Engine:
        """An engine on the loaded model, its passes on the clock; end-of-text is ignored (random weights),
        so every row runs its length."""
        engine = Engine(self.loaded, self.spec, EngineConfig(max_batch_size=max_batch_size,
                                                             max_wait_seconds=wait_seconds,
                                                             prefix_caching=prefix_caching))
        engine.eos_token_ids = frozenset()
        self.clock.watch(engine)
        return engine

    def floor_seconds(self, steps: Steps) -> float:
        """The step's bytes (every weight once, the batch's KV cache) at the measured copy bandwidth."""
        return (self.weight_bytes + self.kv_slot_bytes * steps.slots) / self.bandwidth

    def warm_up(self) -> None:
        self.engine_decode(1, 6)
        self.hf_decode(1, 6)

    def engine_decode(self, batch: int, new_tokens: int) -> dict[str, Any]:
        """``batch`` identical greedy requests admitted together (the engine waits for all of them)."""
        engine = self.engine(batch, wait_seconds=1.0)
        params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, truncate=self.sizes.prompt_tokens)
        self.clock.clear()
        reset_peak(self.device)
        start = time.perf_counter()
        try:
            seqs = [engine.submit(self.text, params) for _ in range(batch)]
            assert all(generated(engine, seq) == new_tokens for seq in seqs)
        finally:
            engine.close()
        wall = max(seq.finished_at for seq in seqs) - start
        return {"steps": self.clock.decode_steps(), "e2e_tok_s": batch * new_tokens / wall,
                "peak": peak_mib(self.device)}

    def hf_decode(self, batch: int, new_tokens: int) -> dict[str, Any]:
        """HF generate on one static batch of the same prompt."""
        ids = torch.tensor([self.prompt_ids[-self.sizes.prompt_tokens :]] * batch, device=self.device)
        self.clock.clear()
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync(self.device)
        wall = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens
        return {"steps": self.clock.decode_steps(), "e2e_tok_s": batch * new_tokens / wall}

    def mixed(self) -> dict[str, dict[str, float]]:
        """The same mixed-length jobs, all arriving at t=0: continuous batching, then static HF batches."""
        rng = random.Random(1234)
        jobs = [(PROMPTS[i % len(PROMPTS)], rng.randint(*self.sizes.mixed_new)) for i in range(self.sizes.mixed_jobs)]
        cap = self.sizes.mixed_batch
        engine = self.engine(cap, wait_seconds=Settings().batch_wait_ms / 1000)
        start = time.perf_counter()
        try:
            seqs = [engine.submit(text, SamplingParams(max_new_tokens=n, do_sample=False)) for text, n in jobs]
            tokens = sum(generated(engine, seq) for seq in seqs)
        finally:
            engine.close()
        latencies = [seq.finished_at - start for seq in seqs]
        continuous = summarise(latencies, tokens, max(latencies))
        latencies, tokens, start = [], 0, time.perf_counter()
        for offset in range(0, len(jobs), cap):
            group = jobs[offset : offset + cap]
            longest = max(n for _, n in group)  # a static batch runs until its longest job is done
            enc = self.loaded.tokenizer([text for text, _ in group], return_tensors="pt", padding=True,
                                        padding_side="left").to(self.device)
            self.model.generate(**enc, do_sample=False, max_new_tokens=longest, min_new_tokens=longest)
            sync(self.device)
            latencies += [time.perf_counter() - start] * len(group)
            tokens += sum(n for _, n in group)
        return {"continuous": continuous, "static": summarise(latencies, tokens, max(latencies))}

    def prefill(self, length: int, batch: int) -> dict[str, Any]:
        """``batch`` prompts of ``length`` tokens through the engine, one new token each (best of two): the
        time from submitting them to the last one's first token, and the peak memory meanwhile."""
        params = SamplingParams(max_new_tokens=1, do_sample=False, truncate=length)
        text = self.loaded.tokenizer.decode(self.prompt_ids[-length - 8 :])
        best = float("inf")
        for _ in range(2):
            engine = self.engine(batch, wait_seconds=1.0, prefix_caching=False)
            try:
                sync(self.device)
                reset_peak(self.device)
                start = time.perf_counter()
                seqs = [engine.submit(text, params) for _ in range(batch)]
                assert all(generated(engine, seq) == 1 for seq in seqs)
                best = min(best, max(seq.finished_at for seq in seqs) - start)
            finally:
                engine.close()
        kv_slot = self.kv_slot_bytes
        return {"seconds": best, "peak": peak_mib(self.device), "kv": batch * length * kv_slot / MIB,
                "budget": self.budget_slots * kv_slot / MIB}

    def close(self) -> None:
        self.clock.close()


def generated(engine: Engine, seq: Sequence) -> int:
    """Tokens a finished request generated (its error raised)."""
    seq.done.wait()
    return engine.result(seq).output.generated_tokens


def measure_model(name: str, model_dir: Path, device: torch.device, sizes: Sizes, bandwidth: float,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Parts 2 and 3 for one model; what was measured before a failure is kept, with the error."""
    started = time.perf_counter()
    spec = resolve_model(str(model_dir))
    bench = Bench(load_model(spec, device), spec, sizes, bandwidth)
    found: dict[str, Any] = {"name": name, "dtype": str(bench.loaded.dtype).removeprefix("torch."),
                             "weights": bench.weight_bytes / MIB, "load_s": time.perf_counter() - started}

    def measure() -> None:
        bench.warm_up()
        found["decode"] = {}
        for batch in sizes.batches:
            print(f"  {name}: decode at batch {batch}", flush=True)
            engine = bench.engine_decode(batch, sizes.new_tokens)
            found["decode"][batch] = {"engine": engine, "hf": bench.hf_decode(batch, sizes.new_tokens),
                                      "floor": bench.floor_seconds(engine["steps"])}
        if not args.skip_mixed:
            print(f"  {name}: mixed lengths", flush=True)
            found["mixed"] = bench.mixed()
        if not args.skip_prefill:
            print(f"  {name}: prefill", flush=True)
            found["prefill"] = {}
            for length in sizes.prefill_lengths:
                for batch in sizes.prefill_batches:
                    found["prefill"][length, batch] = bench.prefill(length, batch)

    error, failed = guarded(measure)
    if failed:
        found["error"] = error
    bench.close()
    return found


# -- part 1: the stack ------------------------------------------------------------------------------


def put_redis_on_path(binary: str, bin_dir: Path) -> None:
    """Make ``redis-server`` on PATH run ``binary``, with the libraries ``dpkg -x`` put beside it."""
    binary = os.path.abspath(binary)
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"--redis-server {binary}: no such executable")
    root = Path(binary).parent.parent.parent  # DIR/usr/bin/redis-server after `dpkg -x PACKAGE DIR`
    arch = f"{platform.machine()}-linux-gnu"
    libs = f"{root / 'usr' / 'lib' / arch}:{root / 'lib' / arch}"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "redis-server"
    # Only redis sees these libraries: the Python processes keep the machine's own.
    shim.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
                    f'exec "{binary}" "$@"\n')
    shim.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def run_stack(model_dir: Path, device: torch.device, redis_binary: str | None, logs: Path) -> dict[str, Any]:
    """The launcher's plan, then one job through Redis and Celery to one real worker."""
    from jobs.celery_app import make_celery, send_generate
    from jobs.schema import GenerateParameters, Job, new_job_id
    from jobs.store import JobStore
    from jobs.workers import WorkerDirectory
    from tests.support import RedisServer, service_env, start_worker, wait_for

    command = ("-m", "worker", "--gpus", "all" if device.type == "cuda" else "none")
    dry = subprocess.run([sys.executable, *command, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env=service_env("redis://127.0.0.1:1/0", str(model_dir), **STACK_DEFAULTS))
    if dry.returncode:
        raise RuntimeError(f"the launcher's dry run failed:\n{tail(dry.stderr)}")
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "worker.log"
    log_path.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bloomq-bench-gpu-"))
    server, worker = RedisServer(work / "redis"), None
    try:
        if redis_binary:
            put_redis_on_path(redis_binary, work / "bin")
        server.start()
        env = service_env(server.url, str(model_dir), **STACK_DEFAULTS)
        client = redis.Redis.from_url(server.url)
        started = time.perf_counter()
        worker = start_worker(server.url, str(model_dir), log_path, command=command, **STACK_DEFAULTS)

        def announced() -> list[Any]:
            if not worker.alive():
                raise RuntimeError(f"the worker exited:\n{tail(worker.log())}")
            return WorkerDirectory(client).live()

        info = wait_for(announced, timeout=600, interval=0.2, what="the worker to announce itself")[0]
        load_s = time.perf_counter() - started
        store = JobStore(client, retention_seconds=3600)
        params = GenerateParameters(max_new_tokens=32, do_sample=False).normalised(32)
        job = Job(id=new_job_id(), model=info.model, inputs=PROMPTS[0], parameters=params)
        celery = make_celery(Settings.from_env(env))
        submitted = time.perf_counter()
        store.create(job)
        send_generate(celery, job.id, job.queue)
        done = wait_for(lambda: (j := store.get(job.id)) is not None and j.status.terminal and j, timeout=300,
                        interval=0.05, what="the job to finish")
        end_to_end = time.perf_counter() - submitted
        celery.close()
    except Exception:
        if worker is not None:
            print(tail(worker.log()), file=sys.stderr)
        raise
    finally:
        if worker is not None:
            worker.stop(timeout=60)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    output = done.output
    return {"command": " ".join(command), "plan": dry.stdout.strip(), "info": info, "load_s": load_s, "status": done.status.value,
            "tokens": output.generated_tokens if output else 0, "chars": len(output.generated_text) if output else 0,
            "queue_s": done.metrics.queue_seconds, "model_s": done.metrics.inference_seconds, "e2e_s": end_to_end,
            "error": done.error.message if done.error else ""}


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- tables -----------------------------------------------------------------------------------------


def describe(device: torch.device) -> str:
    import transformers

    if device.type != "cuda":
        return f"{machine()}, transformers {transformers.__version__}"
    props = torch.cuda.get_device_properties(device)
    driver = "unknown (no nvidia-smi)"
    if shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True).stdout.strip() or driver
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), driver {driver}, CUDA {torch.version.cuda}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def command_line() -> str:
    """This run's command, with absolute paths cut to their last part (they name only the machine it ran on)."""
    return " ".join(["python bench/gpu.py", *(Path(a).name if os.path.isabs(a) else a for a in sys.argv[1:])])


def render_stack(stack: dict[str, Any] | str) -> list[str]:
    lines = ["### 1. The stack on this machine", ""]
    if isinstance(stack, str):
        return [*lines, f"Failed: {stack}", ""]
    info = stack["info"]
    lines += [f"`python {stack['command']} --dry-run`:", "", "```", stack["plan"], "```", "",
              "| worker | device | GPUs it sees | dtype | ready after s | job | tokens | text chars | queue s | "
              "model s | submit→final s |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
              f"| {info.name} | {info.device} | {','.join(info.devices) or '—'} | {info.dtype} | "
              f"{stack['load_s']:.1f} | {stack['status']} | {stack['tokens']} | {stack['chars']} | "
              f"{stack['queue_s'] or 0.0:.3f} | {stack['model_s'] or 0.0:.3f} | {stack['e2e_s']:.3f} |", ""]
    if stack["error"]:
        lines += [f"Job error: {stack['error']}", ""]
    return lines


def render_models(models: list[dict[str, Any]], sizes: Sizes, bandwidth: float) -> list[str]:
    lines = ["### 2. Decode step, engine alone", "",
             f"Greedy; prompt {sizes.prompt_tokens} tokens, {sizes.new_tokens} new (end-of-text ignored); step = "
             "interval between successive decode calls of the model, first 2 skipped; floor = (weights + KV cache "
             f"of the step) ÷ {bandwidth / 1e9:.0f} GB/s measured copy bandwidth. e2e tok/s includes prefill.", "",
             "| model | dtype | batch | step ms | tok/s | floor ms | step/floor | HF step ms | HF tok/s | "
             "engine/HF step | e2e tok/s | HF e2e tok/s | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        for batch, d in m.get("decode", {}).items():
            eng, hf = d["engine"]["steps"], d["hf"]["steps"]
            lines.append(f"| {m['name']} | {m['dtype']} | {batch} | {eng.seconds * 1e3:.2f} | "
                         f"{eng.rows / eng.seconds:.1f} | {d['floor'] * 1e3:.3f} | {eng.seconds / d['floor']:.2f} | "
                         f"{hf.seconds * 1e3:.2f} | {hf.rows / hf.seconds:.1f} | {eng.seconds / hf.seconds:.2f} | "
                         f"{d['engine']['e2e_tok_s']:.1f} | {d['hf']['e2e_tok_s']:.1f} | {d['engine']['peak']} |")
    lines.append("")
    if any("mixed" in m for m in models):
        lo, hi = sizes.mixed_new
        lines += [f"Mixed lengths: {sizes.mixed_jobs} greedy jobs at t=0, {lo}..{hi} new tokens (seed 1234); the "
                  f"engine with max batch {sizes.mixed_batch} against HF generate on static batches of "
                  f"{sizes.mixed_batch} in arrival order (each runs to its longest job).", "",
                  "| model | setup | jobs/s | tok/s | mean latency s | p95 latency s | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for m in models:
            for setup, r in m.get("mixed", {}).items():
                lines.append(f"| {m['name']} | {setup} | {r['jobs_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
                             f"{r['mean_latency']:.3f} | {r['p95_latency']:.3f} | {r['wall']:.3f} |")
        lines.append("")
    if any("prefill" in m for m in models):
        lines += ["### 3. Prefill", "",
                  "The engine's prefill (submit to the first token of the last prompt, chunks of the step "
                  "token budget, best of 2); peak = allocated device memory during it, weights included; KV = the prompts' "
                  "cache; budget = the engine's KV pool right after loading (CUDA: 80 % of the free memory "
                  "less one step's activations; CPU: half the available RAM less the same).", "",
                  "| model | prompt tokens | batch | prefill ms | prompt tok/s | peak MiB | weights MiB | KV MiB | "
                  "KV budget MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in models:
            for (length, batch), p in m.get("prefill", {}).items():
                lines.append(f"| {m['name']} | {length} | {batch} | {p['seconds'] * 1e3:.1f} | "
                             f"{length * batch / p['seconds']:.0f} | {p['peak']} | {m['weights']:.1f} | "
                             f"{p['kv']:.1f} | {p['budget']:.0f} |")
        lines.append("")
    failed = [m for m in models if "error" in m]
    lines += [f"{m['name']} failed: {m['error']}" for m in failed] + ([""] if failed else [])
    return lines


def render_goals(models: list[dict[str, Any]]) -> list[str]:
    rows: list[tuple[str, str, str, str, bool | None]] = []
    for m in models:
        decode = m.get("decode", {})
        if 1 in decode:
            one = decode[1]
            ratio = one["engine"]["steps"].seconds / one["floor"]
            applies = m["name"] in FLOOR_GOAL_MODELS
            rows.append(("batch-1 step ÷ floor", m["name"], f"{ratio:.2f}×", "≤ 1.5× (bloom-1b7, bloom-7b1)",
                         ratio <= 1.5 if applies else None))
            vs_hf = one["engine"]["steps"].seconds / one["hf"]["steps"].seconds
            rows.append(("batch-1 engine step ÷ HF generate step", m["name"], f"{vs_hf:.2f}×", "≤ 1×", vs_hf <= 1.0))
        if 1 in decode and 64 in decode:
            tok = [decode[b]["engine"]["steps"] for b in (1, 64)]
            gain = (tok[1].rows / tok[1].seconds) / (tok[0].rows / tok[0].seconds)
            rows.append(("batch-64 tok/s ÷ batch-1 tok/s", m["name"], f"{gain:.1f}×", "≥ 20×", gain >= 20))
        if "mixed" in m:
            gain = m["mixed"]["continuous"]["jobs_per_s"] / m["mixed"]["static"]["jobs_per_s"]
            rows.append(("continuous ÷ static jobs/s (mixed lengths)", m["name"], f"{gain:.2f}×", "≥ 2×", gain >= 2))
    lines = ["### Goals", "", "| goal | model | measured | target | met |", "|---|---|---:|---|---|"]
    verdict = {True: "yes", False: "no", None: "— (not a goal model)"}
    lines += [f"| {goal} | {name} | {value} | {target} | {verdict[met]} |" for goal, name, value, target, met in rows]
    return [*lines, ""]


def render(device: torch.device, bandwidth: float, stack: dict[str, Any] | str | None, models: list[dict[str, Any]],
           sizes: Sizes) -> str:
    loaded = ", ".join(f"{m['name']} {m['weights']:.1f} MiB, loaded in {m['load_s']:.1f} s" for m in models)
    lines = [f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `{command_line()}`", "",
             f"Device: {describe(device)}. Copy bandwidth: {bandwidth / 1e9:.1f} GB/s "
             f"({sizes.copy_mib} MiB `copy_`, read + write). Models: random-init checkpoints of the named shapes, "
             f"init std 0.02, seed 0 ({loaded}).", ""]
    if stack is not None:
        lines += render_stack(stack)
    return "\n".join(lines + render_models(models, sizes, bandwidth) + render_goals(models))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, batches 1 and 4, a few tokens: seconds")
    parser.add_argument("--models", help="comma-separated shapes: " + ", ".join(SHAPES) +
                        " (default bloom-560m,bloom-1b7; tiny with --quick)")
    parser.add_argument("--batches", help="decode batch sizes (default 1,8,32,64,128; 1,4 with --quick)")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--cache", type=Path, default=ROOT / ".models", help="where checkpoints are built (once)")
    parser.add_argument("--redis-server", help="the redis-server binary (default: the one on PATH)")
    parser.add_argument("--logs", type=Path, default=LOGS, help="where part 1 writes the worker's log")
    parser.add_argument("--skip-stack", action="store_true", help="skip part 1 (launcher, redis, worker)")
    parser.add_argument("--skip-mixed", action="store_true", help="skip the mixed-length run")
    parser.add_argument("--skip-prefill", action="store_true", help="skip part 3")
    parser.add_argument("--skip-parallel", action="store_true", help="skip part 4")
    parser.add_argument("--skip-engine", action="store_true", help="skip part 5")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    sizes = QUICK if args.quick else FULL
    if args.batches:
        sizes = dataclasses.replace(sizes, batches=tuple(int(b) for b in args.batches.split(",")))
    names = (args.models or ("tiny" if args.quick else "bloom-560m,bloom-1b7")).split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    device = pick_device(args.device)
    dirs = {name: build_checkpoint(args.cache, name) for name in names}
    failed = False
    stack: dict[str, Any] | str | None = None
    if not args.skip_stack:
        print(f"part 1: the stack with {names[0]} ...", flush=True)
        stack, failed = guarded(lambda: run_stack(dirs[names[0]], device, args.redis_server, args.logs))
    bandwidth = copy_bandwidth(device, sizes.copy_mib)
    models = []
    for name in names:
        print(f"part 2/3: {name} ...", flush=True)
        found, error = guarded(lambda name=name: measure_model(name, dirs[name], device, sizes, bandwidth, args))
        models.append({"name": name, "error": found, "weights": 0.0, "load_s": 0.0} if error else found)
        gc.collect()  # the model is unreachable once measure_model returned: free its memory for the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        failed = failed or "error" in models[-1]
    table = render(device, bandwidth, stack, models, sizes)
    if device.type == "cuda" and not args.quick and not args.skip_parallel:
        print("part 4: tensor-parallel and quantized decode ...", flush=True)
        found, error = guarded(lambda: parallel_rows(args.cache, names[0]))
        failed = failed or error
        table += "\n" + (f"\nPart 4 failed: {found}" if error else found)
    if device.type == "cuda" and not args.quick and not args.skip_engine:
        print("part 5: the engine benchmark on the GPU ...", flush=True)
        found, error = guarded(lambda: engine_rows(args.cache))
        failed = failed or error
        table += "\n" + (f"\nPart 5 failed: {found}" if error else found)
    report(table, record=device.type == "cuda" and not args.quick and not args.no_record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 1 if failed else 0


def parallel_rows(cache: Path, name: str) -> str:
    """Part 4: bench/parallel.py (run as its own program) for each tensor-parallel size the visible GPUs
    allow (and the heads divide), then int8 (weight-only and with dynamic activations: which the worker should
    pick on a GPU) and int4 on one GPU, at batch 1, 8, 32."""
    hidden, layers, heads, vocab = SHAPES[name]
    sizes = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count() and heads % n == 0]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "parallel.md"
        subprocess.run([sys.executable, str(ROOT / "bench" / "parallel.py"), "--device", "cuda",
                        "--tp", ",".join(map(str, sizes)), "--quantize", "none,int8-weight-only,int8-dynamic,int4", "--hidden", str(hidden),
                        "--layers", str(layers), "--heads", str(heads), "--vocab", str(vocab or 250880),
                        "--cache", str(cache), "--no-record", "--out", str(out)], check=True)
        return f"Part 4: tensor-parallel and quantized decode, {name} shape\n" + out.read_text()


def engine_rows(cache: Path) -> str:
    """Part 5: bench/engine.py (run as its own program) on the GPU in bf16: the attention comparison, then
    its engine parts with FlexAttention (``auto`` on a GPU) and with gathering."""
    found = []
    with tempfile.TemporaryDirectory() as scratch:
        for attention, parts in (("auto", "attention,stall,prefix,kv"), ("gather", "stall,prefix,kv")):
            out = Path(scratch) / f"engine-{attention}.md"
            subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), "--device", "cuda", "--dtype",
                            "bfloat16", "--parts", parts, "--step-tokens", "128,512", "--attention", attention,
                            "--cache", str(cache), "--no-record", "--out", str(out)], check=True)
            found.append(f"Part 5 ({attention}): the engine benchmark on the GPU\n" + out.read_text())
    return "\n".join(found)


def guarded(part: Callable[[], Any]) -> tuple[Any, bool]:
    """Run one part; a failure is printed in full and reported in the tables, and the other parts still run
    (device time is scarce), but the exit status says so."""
    try:
        return part(), False
    except Exception as exc:
        traceback.print_exc()
        return f"{type(exc).__name__}: {exc}", True


if __name__ == "__main__":
    # A SIGTERM ends the run through the normal exit path, so the processes it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

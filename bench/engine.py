"""Engine benchmark: the paged engine alone, in this process, on random BLOOM checkpoints (no stack).

    make bench-engine                      # or: python bench/engine.py [--parts stall,prefix,kv,host,rows,attention]

1. stall: two jobs decoding 300 tokens each; a 900-token prompt joins. Each running job's gaps between
   tokens: the median before the join, the longest until the joining job has its first token. Repeated
   for each ``--step-tokens`` value (the per-pass token budget, BLOOMQ_STEP_TOKENS).
2. prefix: 24 jobs whose prompts share an 876-token prefix (each adds a few words), against 24 distinct
   prompts of the same length, 16 new tokens each, all submitted at once; prefix caching on.
3. kv: the mixed 32-job workload of ``make bench`` (prompts of bench/throughput.py, 8..128 new tokens,
   seed 1234), all at once: KV slots held (whole blocks) against the tokens in use, over every pass; beside
   it the figure of a padded cache (every row as wide as the widest, the previous engine's layout).
4. host: one 2,000-token job with a stop sequence that never matches, on the tiny checkpoint (so host
   work shows): per-token host time (a step's wall time less its forward pass), first 100 against last 100.
5. rows: host time per decode pass at 1, 8, 32 and 64 rows (``--rows``): each pass's wall time less its
   forward pass, every row decoding (48 tokens each, on the checkpoint of parts 1-3).
6. attention: one layer's attention over the paged pool, the two ways a worker can read it
   (BLOOMQ_ATTENTION): ``gather`` (each row's blocks copied out, then SDPA) and ``flex`` (FlexAttention
   compiled, reading the blocks in place), bloom-560m's heads (16 × 64), rows' blocks scattered over the
   pool: 32 decode rows at short and long contexts, and a 512-token prompt chunk, in pools of two sizes.
   Per pass: building the plan once, then attending once per layer (24 layers); and the largest difference
   between the two outputs.

Parts 1–3 and 5 run on a random checkpoint of hidden 512, 12 layers, 8 heads and BLOOM's 250,880-word
vocabulary (the shape the engine issue was measured on; built once into ``--cache``). Tables are printed
and appended to bench/RESULTS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import PROMPTS, machine, report, workload  # noqa: E402
from config.models import resolve_model  # noqa: E402
from worker.engine.capacity import EngineConfig  # noqa: E402
from worker.engine.core import Engine  # noqa: E402
from worker.engine.params import SamplingParams  # noqa: E402
from worker.engine.sequence import Sequence  # noqa: E402
from worker.model.loading import LoadedModel, load_model, pick_device  # noqa: E402

MID = {"hidden_size": 512, "n_layer": 12, "n_head": 8, "vocab_size": 250880}


def build(cache: Path, name: str, **shape: Any) -> Path:
    from worker.model.tiny import build_tiny_bloom

    target = cache / name
    if not (target / "config.json").exists():
        print(f"building {name} in {target} (once)", flush=True)
        build_tiny_bloom(target, **shape)
    return target


class Clock:
    """When each row got each token (after the step that chose it), and each forward pass's span."""

    def __init__(self, engine: Engine) -> None:
        self.tokens: dict[int, list[float]] = {}
        self.passes: list[tuple[float, float]] = []
        self.samples: list[tuple[int, int, int, int]] = []  # per pass: tokens in use, slots held, rows, widest
        choose, forward = engine._choose, engine.paged.forward

        def noted_choose(ready: list[Any]) -> None:
            choose(ready)
            now = time.perf_counter()
            for item, _ in ready:
                self.tokens.setdefault(id(item.seq), []).append(now)

        def noted_forward(chunks: list[Any]) -> Any:
            running = engine.scheduler.running
            lengths = [len(s.ids) for s in running]
            self.samples.append((sum(lengths), engine.pool.held * engine.pool.block_size, len(running),
                                 max(lengths, default=0)))
            start = time.perf_counter()
            out = forward(chunks)
            self.passes.append((start, time.perf_counter()))
            return out

        engine._choose = noted_choose  # type: ignore[method-assign]
        engine.paged.forward = noted_forward  # type: ignore[method-assign]

    def of(self, seq: Sequence) -> list[float]:
        return self.tokens.get(id(seq), [])


ATTENTION = {"attention": "auto"}  # --attention: the engine's BLOOMQ_ATTENTION in parts 1-4


def engine_for(loaded: LoadedModel, model_dir: Path, **config: Any) -> Engine:
    engine = Engine(loaded, resolve_model(str(model_dir)), EngineConfig(**{**ATTENTION, **config}))
    engine.eos_token_ids = frozenset()  # random weights: every job runs its length
    return engine


def text_of(loaded: LoadedModel, tokens: int, salt: int) -> str:
    """A prompt of exactly ``tokens`` tokens: words drawn with ``salt``, trimmed by the tokenizer."""
    rng = random.Random(salt)
    words = " ".join(PROMPTS).split()
    ids: list[int] = []
    while len(ids) < tokens:
        ids += loaded.tokenizer(" " + " ".join(rng.choice(words) for _ in range(64))).input_ids
    return loaded.tokenizer.decode(ids[:tokens])


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False)


def part_stall(loaded: LoadedModel, model_dir: Path, budgets: list[int]) -> list[dict[str, Any]]:
    rows = []
    for budget in budgets:
        engine = engine_for(loaded, model_dir, step_tokens=budget, max_batch_size=8)
        clock = Clock(engine)
        try:
            running = [engine.submit(p, greedy(300)) for p in PROMPTS[:2]]
            while min(len(clock.of(s)) for s in running) < 40:
                time.sleep(0.01)
            joined_at = time.perf_counter()
            joined = engine.submit(text_of(loaded, 900, salt=budget), greedy(8))
            for seq in [*running, joined]:
                seq.done.wait()
            first = clock.of(joined)[0]
            before, during = [], []
            for seq in running:
                times = clock.of(seq)
                gaps = list(zip(times, times[1:], strict=False))
                before += [b - a for a, b in gaps if b <= joined_at]
                during += [b - a for a, b in gaps if b > joined_at and a <= first]
            median = statistics.median(before)
            rows.append({"budget": budget, "median": median, "longest": max(during), "join": first - joined_at,
                         "ratio": max(during) / median})
        finally:
            engine.close()
        print(f"  stall, {budget} tokens a pass: {rows[-1]['ratio']:.1f}× the median gap", flush=True)
    return rows


def part_prefix(loaded: LoadedModel, model_dir: Path) -> dict[str, Any]:
    prefix = text_of(loaded, 876, salt=1)
    suffixes = [f" Question {i}: what follows {w}?" for i, w in enumerate(" ".join(PROMPTS).split()[:24])]
    shared = [prefix + s for s in suffixes]
    lengths = [len(loaded.tokenizer(p).input_ids) for p in shared]
    distinct = [text_of(loaded, n, salt=100 + i) for i, n in enumerate(lengths)]
    found: dict[str, Any] = {"prompt_tokens": statistics.mean(lengths)}
    for name, prompts in (("distinct", distinct), ("shared", shared)):
        engine = engine_for(loaded, model_dir, max_batch_size=24, max_wait_seconds=0.2)
        try:
            start = time.perf_counter()
            seqs = [engine.submit(p, greedy(16)) for p in prompts]
            for seq in seqs:
                seq.done.wait()
            found[name] = time.perf_counter() - start
            found[f"{name}_counters"] = engine.prefix_counters
        finally:
            engine.close()
        print(f"  prefix, {name}: {found[name]:.1f} s", flush=True)
    return found


def part_kv(loaded: LoadedModel, model_dir: Path, block_sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for block in block_sizes:
        engine = engine_for(loaded, model_dir, max_batch_size=32, max_wait_seconds=0.2, block_size=block)
        clock = Clock(engine)
        try:
            start = time.perf_counter()
            seqs = [engine.submit(text, greedy(n)) for text, n in workload(32)]
            for seq in seqs:
                seq.done.wait()
            wall = time.perf_counter() - start
        finally:
            engine.close()
        used = sum(s[0] for s in clock.samples)
        held = sum(s[1] for s in clock.samples)
        padded = sum(s[2] * s[3] for s in clock.samples)
        tokens = sum(len(s.tokens) for s in seqs)
        print(f"  kv, {block}-token blocks: {used / held:.3f} of held slots in use", flush=True)
        rows.append({"block": block, "used_per_held": used / held, "used_per_padded": used / padded,
                     "passes": len(clock.samples), "wall": wall, "tok_s": tokens / wall})
    return rows


def part_host(tiny: LoadedModel, tiny_dir: Path, tokens: int, runs: int = 3) -> dict[str, Any]:
    """Medians per window (a few slow steps, a collection or a context switch, should not decide it), over
    ``runs`` runs; the ratio reported is the median run's."""
    found = []
    for _ in range(runs):
        engine = engine_for(tiny, tiny_dir, max_batch_size=1)
        clock = Clock(engine)
        try:
            params = SamplingParams(max_new_tokens=tokens, do_sample=False, stop=["<never in this text>"])
            seq = engine.submit("Once upon a time", params)
            seq.done.wait()
        finally:
            engine.close()
        starts = [start for start, _ in clock.passes]
        host = [(starts[i + 1] - starts[i]) - (end - start) for i, (start, end) in enumerate(clock.passes[:-1])]
        first, last = statistics.median(host[1:101]), statistics.median(host[-100:])
        found.append({"tokens": len(seq.tokens), "first": first, "last": last, "ratio": last / first})
        print(f"  host: first 100 {first * 1e3:.3f} ms, last 100 {last * 1e3:.3f} ms", flush=True)
    found.sort(key=lambda run: run["ratio"])
    return {**found[len(found) // 2], "ratios": [run["ratio"] for run in found]}


def part_rows(mid: LoadedModel, mid_dir: Path, sizes: list[int], tokens: int = 48) -> list[dict[str, Any]]:
    """Per decode pass with ``rows`` rows decoding: the forward pass and the host time around it (a pass's wall
    time less its forward: scheduling, sampling, bookkeeping), medians over the middle half of the passes
    (every row decoding by then)."""
    found = []
    for rows in sizes:
        engine = engine_for(mid, mid_dir, max_batch_size=rows)
        clock = Clock(engine)
        try:
            params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True)
            seqs = [engine.submit(text_of(mid, 8, salt), params) for salt in range(rows)]
            for seq in seqs:
                seq.done.wait()
        finally:
            engine.close()
        passes = clock.passes
        middle = range(len(passes) // 4, 3 * len(passes) // 4)
        forward = statistics.median(passes[i][1] - passes[i][0] for i in middle)
        host = statistics.median((passes[i + 1][0] - passes[i][0]) - (passes[i][1] - passes[i][0]) for i in middle)
        found.append({"rows": rows, "forward": forward, "host": host, "share": host / (host + forward),
                      "tok_s": rows / (host + forward)})
        print(f"  rows {rows}: forward {forward * 1e3:.1f} ms, host {host * 1e3:.2f} ms", flush=True)
    return found


def part_attention(device: torch.device, dtype: torch.dtype, pools: list[int], layers: int = 24,
                   repeats: int = 5) -> list[dict[str, Any]]:
    """Median seconds of one pass's attention (plan once, ``layers`` attends) each way, per case."""
    from transformers import BloomConfig

    from worker.engine import flex
    from worker.engine.attention import AttentionPlan, alibi_slopes
    from worker.engine.chunk import Chunk
    from worker.engine.paged import PagedKV

    heads, dim, size = 16, 64, 16
    config = BloomConfig(hidden_size=heads * dim, n_head=heads, n_layer=1)
    slopes, scale = alibi_slopes(heads).to(device), dim ** -0.5
    rows = []
    for slots in pools:
        torch._dynamo.reset()  # a worker has one pool: compile afresh for each, as a new worker would
        kv = PagedKV(config, slots // size, size, dtype, device)
        with torch.inference_mode():
            name, flex_plan = flex.choose("flex", kv, device, slopes, scale)
            keys, values = kv.keys[0], kv.values[0]
            keys.normal_(), values.normal_()
        assert name == "flex"
        rng = random.Random(slots)
        order = list(range(kv.num_blocks))
        rng.shuffle(order)
        cases = {"32 decode rows, contexts 20–140": [(1, rng.randint(20, 140)) for _ in range(32)],
                 "32 decode rows, contexts 800–1200": [(1, rng.randint(800, 1200)) for _ in range(32)],
                 "a 512-token chunk after 512": [(512, 1024)]}
        for case, shapes in cases.items():
            spare = iter(order)
            chunks = [Chunk([1] * count, end - count, [next(spare) for _ in range(-(-end // size))])
                      for count, end in shapes]
            query = torch.randn(sum(count for count, _ in shapes), heads, dim, device=device, dtype=dtype)
            timed = {}
            with torch.inference_mode():
                for how, factory in (("gather", AttentionPlan), ("flex", flex_plan)):
                    one_pass = functools.partial(_attention_pass, factory, chunks, kv, query, slopes, scale, layers)
                    one_pass()  # warm-up (and, for flex, any shape not compiled yet)
                    seconds = []
                    for _ in range(repeats):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        timed[how + "_out"] = one_pass()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        seconds.append(time.perf_counter() - start)
                    timed[how] = statistics.median(seconds)
            diff = float((timed["gather_out"].float() - timed["flex_out"].float()).abs().max())
            print(f"  attention, {slots} slots, {case}: gather {timed['gather'] * 1e3:.1f} ms, "
                  f"flex {timed['flex'] * 1e3:.1f} ms a pass", flush=True)
            rows.append({"slots": slots, "case": case, "gather": timed["gather"], "flex": timed["flex"],
                         "diff": diff})
    return rows


def _attention_pass(factory: Any, chunks: list[Any], kv: Any, query: torch.Tensor, slopes: torch.Tensor,
                    scale: float, layers: int) -> torch.Tensor:
    """One pass's attention: the plan built, then ``layers`` attends (all over layer 0's pool)."""
    plan = factory(chunks, kv.null_slot, query.device, kv.block_size)
    for _ in range(layers):
        out = plan.attend(query, kv.keys[0], kv.values[0], slopes, scale)
    return out


def table(intro: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A paragraph and a markdown table of numbers (right-aligned), then a blank line."""
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def render(args: argparse.Namespace, found: dict[str, Any]) -> str:
    command = " ".join(["python bench/engine.py", *sys.argv[1:]])
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — `{command}`", "",
             f"Machine: {machine()}. Checkpoint: random BLOOM, hidden 512, 12 layers, 8 heads, vocabulary "
             f"250,880, {args.dtype} on {args.device}; torch {torch.__version__}. Engine defaults unless named "
             f"(attention: {args.attention}).", ""]
    if "stall" in found:
        lines += table("Stall: two jobs decoding 300 tokens, a 900-token prompt joins (target: longest gap ≤ 3× "
                       "the median; the previous engine: 15×).",
                       ["tokens a pass", "median gap ms", "longest gap while joining ms", "ratio",
                        "join → first token s"],
                       [[row["budget"], f"{row['median'] * 1e3:.1f}", f"{row['longest'] * 1e3:.1f}",
                         f"{row['ratio']:.1f}×", f"{row['join']:.2f}"] for row in found["stall"]])
    if "prefix" in found:
        p = found["prefix"]
        lines += [f"Prefix: 24 jobs, prompts of {p['prompt_tokens']:.0f} tokens, 16 new tokens each, submitted "
                  "at once (target ≥ 5×; the previous engine: 1.07×).", "",
                  "| prompts | wall s | prompt tokens reused | computed |", "|---|---:|---:|---:|"]
        for name in ("distinct", "shared"):
            counters = p[f"{name}_counters"]
            lines.append(f"| {name} | {p[name]:.1f} | {counters['reused']} | {counters['computed']} |")
        lines += ["", f"- shared prefix {p['distinct'] / p['shared']:.1f}× faster than distinct prompts", ""]
    if "kv" in found:
        lines += table("KV on the mixed 32-job workload of `make bench` (all submitted at once): tokens in use per "
                       "KV slot held, over every pass (target ≥ 0.9); beside it, what a padded cache (rows × "
                       "widest, the previous engine's layout, before its admission reserve) would have held.",
                       ["block tokens", "in use / held", "in use / padded", "passes", "wall s", "generated tok/s"],
                       [[k["block"], f"**{k['used_per_held']:.3f}**", f"{k['used_per_padded']:.3f}", k["passes"],
                         f"{k['wall']:.1f}", f"{k['tok_s']:.1f}"] for k in found["kv"]])
    if "host" in found:
        h = found["host"]
        ratios = ", ".join(f"{r:.2f}×" for r in h["ratios"])
        lines += [f"Host time per token (a step's wall time less its forward pass; median per window), one "
                  f"{h['tokens']}-token job with a stop sequence (tiny checkpoint), median of {len(h['ratios'])} "
                  f"runs: first 100 tokens {h['first'] * 1e3:.3f} ms, last 100 {h['last'] * 1e3:.3f} ms: "
                  f"**{h['ratio']:.2f}×** (target ≤ 1.2×; the runs: {ratios}).", ""]
    if "rows" in found:
        lines += table("Host time per decode pass (a pass's wall time less its forward pass: scheduling, "
                       "sampling, bookkeeping), every row decoding; medians over the middle half of the passes "
                       "(target at 32 rows: ≤ 10 % of the pass).",
                       ["rows", "forward ms", "host ms", "host share", "tok/s"],
                       [[r["rows"], f"{r['forward'] * 1e3:.1f}", f"{r['host'] * 1e3:.2f}", f"**{r['share']:.1%}**",
                         f"{r['tok_s']:.0f}"] for r in found["rows"]])
    if "attention" in found:
        lines += table(f"Attention over the paged pool ({args.dtype}), one pass: the plan built once, then 24 layers' "
                       "attends (16 heads × 64); blocks scattered over the pool. `gather`: rows' blocks copied "
                       "out, then SDPA; `flex`: FlexAttention compiled, blocks read in place.",
                       ["pool slots", "pass", "gather ms", "flex ms", "flex / gather", "largest difference"],
                       [[a["slots"], a["case"], f"{a['gather'] * 1e3:.1f}", f"{a['flex'] * 1e3:.1f}",
                         f"{a['flex'] / a['gather']:.2f}×", f"{a['diff']:.1e}"] for a in found["attention"]])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="stall,prefix,kv,host,rows,attention")
    parser.add_argument("--rows", default="1,8,32,64", help="decode rows the rows part tries")
    parser.add_argument("--step-tokens", default="64,128,512", help="budgets the stall part tries")
    parser.add_argument("--kv-blocks", default="16,8", help="block sizes the kv part tries")
    parser.add_argument("--host-tokens", type=int, default=2000)
    parser.add_argument("--cache", type=Path, default=ROOT / ".models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-pools", default="40960,262144", help="pool sizes (slots) the attention part tries")
    parser.add_argument("--attention", choices=("auto", "gather", "flex"), default="auto",
                        help="BLOOMQ_ATTENTION of the engines in parts 1-4")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    device = pick_device(args.device)
    ATTENTION["attention"] = args.attention
    found: dict[str, Any] = {}
    runs: list[tuple[str, Callable[[], Any]]] = []
    if parts & {"stall", "prefix", "kv", "rows"}:
        mid_dir = build(args.cache, "bench-bloom-mid", **MID)
        mid = load_model(resolve_model(str(mid_dir)), device, args.dtype)
        budgets, blocks = ([int(b) for b in arg.split(",")] for arg in (args.step_tokens, args.kv_blocks))
        runs += [("stall", lambda: part_stall(mid, mid_dir, budgets)), ("prefix", lambda: part_prefix(mid, mid_dir)),
                 ("kv", lambda: part_kv(mid, mid_dir, blocks)),
                 ("rows", lambda: part_rows(mid, mid_dir, [int(r) for r in args.rows.split(",")]))]
    if "host" in parts:
        tiny_dir = build(args.cache, "tiny-bloom")
        tiny = load_model(resolve_model(str(tiny_dir)), device, args.dtype)
        runs.append(("host", lambda: part_host(tiny, tiny_dir, args.host_tokens)))
    if "attention" in parts:
        pools = [int(p) for p in args.attention_pools.split(",")]
        runs.append(("attention", lambda: part_attention(device, getattr(torch, args.dtype), pools)))
    for name, run in runs:
        if name in parts:
            print(f"{name} ...", flush=True)
            found[name] = run()
    text = render(args, found)
    report(text, record=not args.no_record)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor-parallel and quantized decode: the engine's paged pass per step at batch 1, 8 and 32, for each
tensor-parallel size and weight quantization, against the floor of the bytes each rank reads per step.

    make bench-parallel                                  # CPU: TP 1 and 2 (gloo ranks), none/int8/int4
    python bench/parallel.py --device cuda --tp 1,2,4,8  # on GPUs (bench/gpu.py runs it too)

Each configuration starts its ranks (``torch.multiprocessing``), each loading only its slices of a random
BLOOM checkpoint (built once into ``--cache``); rank 0 prefills ``batch`` rows of ``--prompt`` tokens, then
times ``--steps`` decode passes (median) while the other ranks follow, exactly as in a worker group.
floor = (the rank's weight bytes + the KV bytes its heads read in the step) / the device's copy bandwidth,
measured here. On CPU the ranks share the machine's cores (each gets cores / TP threads): a rehearsal of
the path, not a speed claim.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import machine, random_bloom, report  # noqa: E402
from config.models import resolve_model  # noqa: E402
from worker.engine.capacity import EngineConfig, paged_model  # noqa: E402
from worker.engine.chunk import LAST, NONE, Chunk  # noqa: E402
from worker.model.group import Group, GroupEnv, follow  # noqa: E402
from worker.model import quantize  # noqa: E402
from worker.model.loading import load_model  # noqa: E402

BLOCK = 16


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a large copy moves on ``device`` (read + write)."""
    size = 256 * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return 2 * size / min(runs)


def _rank(rank: int, world: int, port: int, checkpoint: str, device_type: str, quantization: str,
          batches: list[int], prompt: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    spec = resolve_model(checkpoint)
    # int8-weight-only and int8-dynamic force one of the two int8 kinds (int8 alone: the device's own pick).
    if quantization.startswith("int8-"):
        quantize.INT8_DYNAMIC[device_type] = quantization == "int8-dynamic"
    loaded = load_model(spec, device, "auto", rank, world, quantization.split("-")[0])
    group = Group(GroupEnv(rank, world, rank), device, timeout=600) if world > 1 else None
    biggest = max(batches)
    config = EngineConfig(max_batch_size=biggest, block_size=BLOCK,
                          max_batch_slots=biggest * (prompt + steps + BLOCK) + BLOCK)
    kv, paged = paged_model(loaded, spec, config, group)
    if rank > 0:
        follow(paged, group)
        group.close()
        return
    rows = []
    blocks_per_row = -(-(prompt + steps + 1) // BLOCK)
    with torch.inference_mode():
        for batch in batches:
            tables = [list(range(r * blocks_per_row, (r + 1) * blocks_per_row)) for r in range(batch)]
            paged.forward([Chunk([5 + (r + i) % 200 for i in range(prompt)], 0, tables[r], NONE)
                           for r in range(batch)])
            times = []
            for step in range(steps):
                chunks = [Chunk([7 + (r + step) % 200], prompt + step, tables[r], LAST) for r in range(batch)]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                paged.forward(chunks)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            context = prompt + steps // 2
            kv_read = batch * context * kv.bytes_per_block(loaded.model.config, 1, loaded.dtype, world)
            rows.append((batch, statistics.median(times), loaded.weights_bytes, kv_read))
    paged.close()
    if group is not None:
        group.close()
    torch.save({"rows": rows, "dtype": str(loaded.dtype).removeprefix("torch.")}, out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(checkpoint: str, device_type: str, world: int, quantization: str, batches: list[int], prompt: int,
            steps: int) -> dict:
    """Run one configuration's ranks; rank 0's figures."""
    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "rows.pt")
        args = (world, _free_port(), checkpoint, device_type, quantization, batches, prompt, steps, out)
        mp.spawn(_rank, args=args, nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def build_checkpoint(cache: Path, hidden: int, layers: int, heads: int, vocab: int) -> Path:
    path = cache / f"bloom-h{hidden}-l{layers}-n{heads}-v{vocab}"
    return random_bloom(path, hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, init_std=0.02)


def table_lines(title: str, results: list[tuple[int, str, dict]], bandwidth: float) -> list[str]:
    lines = [title, "", "| TP | weights | batch | step ms | tokens/s | rank weights MB | floor ms | step / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for world, quantization, figures in results:
        for batch, seconds, weights, kv_read in figures["rows"]:
            floor = (weights + kv_read) / bandwidth
            name = figures["dtype"] if quantization == "none" else f"{quantization} ({figures['dtype']} rest)"
            lines.append(f"| {world} | {name} | {batch} | {seconds * 1e3:.1f} | {batch / seconds:.0f} | "
                         f"{weights / 1e6:.0f} | {floor * 1e3:.2f} | {seconds / floor:.1f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tp", default="1,2", help="tensor-parallel sizes (comma-separated)")
    parser.add_argument("--quantize", default="none,int8-weight-only,int8-dynamic,int4",
                        help="quantizations at TP 1 (comma-separated; int8 alone: the device's own int8 kind)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=250880)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=ROOT / ".models" / "bench")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    checkpoint = str(build_checkpoint(args.cache, args.hidden, args.layers, args.heads, args.vocab))
    results = []
    for world in [int(n) for n in args.tp.split(",")]:
        results.append((world, "none", measure(checkpoint, args.device, world, "none", batches, args.prompt,
                                               args.steps)))
    for quantization in [q for q in args.quantize.split(",") if q and q != "none"]:
        results.append((1, quantization, measure(checkpoint, args.device, 1, quantization, batches, args.prompt,
                                                 args.steps)))
    bandwidth = copy_bandwidth(torch.device("cuda:0" if args.device == "cuda" else "cpu"))
    command = "python bench/parallel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    title = (f"\n## Tensor-parallel and quantized decode ({dt.date.today()}, `{command.strip()}`)\n\n"
             f"Machine: {machine() if args.device == 'cpu' else torch.cuda.get_device_name(0)}. Random BLOOM, hidden "
             f"{args.hidden}, {args.layers} layers, {args.heads} heads, vocabulary {args.vocab}; {args.prompt}-token "
             f"prompts, median of {args.steps} decode passes; copy bandwidth {bandwidth / 1e9:.1f} GB/s.")
    text = "\n".join(table_lines(title, results, bandwidth))
    report(text, record=not args.no_record)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

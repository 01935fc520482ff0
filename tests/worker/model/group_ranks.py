"""What each rank of a tensor-parallel test group runs (started with ``torch.multiprocessing.spawn``).

Every rank loads its shard of the checkpoint and joins a gloo group; rank 0 then drives passes (or an
engine) and saves what it saw to ``out``; the other ranks follow, as they do in a worker group.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from config.models import resolve_model
from worker.engine.capacity import EngineConfig, paged_model
from worker.engine.chunk import ALL, LAST, Chunk
from worker.engine.core import Engine
from worker.engine.params import SamplingParams
from worker.model.group import Group, GroupEnv, GroupLost, follow
from worker.model.loading import load_model
from worker.model.quantize import quantize

BLOCK = 4
ENGINE = EngineConfig(max_batch_size=8, max_batch_slots=512, block_size=BLOCK, step_tokens=16)


def prompts() -> list[list[int]]:
    """Rows of mixed lengths (ids the tiny tokenizer knows, none of them special)."""
    return [[(7 * i + 3 * row) % 500 + 4 for i in range(length)] for row, length in enumerate([3, 9, 17])]


def passes(tables: list[list[int]]) -> list[list[Chunk]]:
    """A prefill of mixed lengths (the longest split into two chunks, the split inside a block), then two
    decode steps of every row."""
    rows = prompts()
    first = [Chunk(rows[0], 0, tables[0], ALL), Chunk(rows[1], 0, tables[1], ALL),
             Chunk(rows[2][:6], 0, tables[2], ALL)]
    second = [Chunk(rows[2][6:], 6, tables[2], ALL)]
    steps = []
    for step in range(2):
        steps.append([Chunk([11 + row + step], len(rows[row]) + step, tables[row], LAST) for row in range(3)])
    return [first, second, *steps]


def tables() -> list[list[int]]:
    """Block tables scattered over the pool (not contiguous, not in order)."""
    return [[9, 2, 30], [5, 17, 1, 8], [12, 3, 22, 27, 6, 40]]


def rank_main(rank: int, world: int, port: int, checkpoint: str, out: str, scenarios: tuple[str, ...]) -> None:
    """Load this rank's shard, join the group, and play ``scenarios`` in order with the other ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    spec = resolve_model(checkpoint)
    loaded = load_model(spec, torch.device("cpu"), "float32", rank, world)
    group = Group(GroupEnv(rank, world, rank), torch.device("cpu"), timeout=20)
    for scenario in scenarios:
        result_file = Path(out) / f"{scenario}-{world}.pt"
        if scenario == "engine":
            if rank == 0:
                engine = Engine(loaded, spec, ENGINE, group=group)
                params = SamplingParams(max_new_tokens=20, do_sample=False)
                texts = [engine.generate(text, params).output.generated_text for text in engine_prompts()]
                engine.stop()
                torch.save(texts, result_file)
            else:
                follow(paged_model(loaded, spec, ENGINE, group)[1], group)
            continue
        if scenario == "int8":
            quantize(loaded.model, "int8", torch.device("cpu"))  # each rank its own slices
        _kv, paged = paged_model(loaded, spec, ENGINE, group)
        if rank == 0:
            torch.save(_drive(paged, scenario), result_file)
            paged.close()
            continue
        if scenario == "failures":
            # Its passes: 0 ok, 1 fails, 2 (pass 1 again) ok, 3 out of memory, 4 (pass 2 again) ok, 5 ok.
            _fail_on_passes(paged, {1: RuntimeError("rank 1 broke"), 3: torch.OutOfMemoryError("rank 1 is full")})
        elif scenario == "lost":
            _fail_on_passes(paged, {1: SystemExit})
        follow(paged, group)
    group.close()


def engine_prompts() -> list[str]:
    return ["Once upon a time", "The quick brown fox jumps over the lazy dog and", "def fibonacci(n):"]


def _drive(paged, scenario: str) -> dict:
    """Rank 0: run the passes; record logits, or what each pass raised."""
    weight = paged.model.transformer.h[0].mlp.dense_h_to_4h.weight
    seen: dict = {"logits": [], "errors": [], "weight_type": type(weight).__name__}
    with torch.inference_mode():
        for index, chunks in enumerate(passes(tables())):
            try:
                seen["logits"].append(paged.forward(chunks))
                seen["errors"].append(None)
            except GroupLost as exc:
                seen["errors"].append(("GroupLost", str(exc)))
                break
            except Exception as exc:
                seen["errors"].append((type(exc).__name__, str(exc)))
                seen["logits"].append(None)
                if scenario == "failures" and index in (1, 2):
                    # As the engine does: the pass is run again (here whole), and must now succeed.
                    seen["logits"][-1] = paged.forward(chunks)
    return seen


def _fail_on_passes(paged, failures: dict) -> None:
    """Make this rank's ``index``-th pass raise (``SystemExit``: the process dies at once)."""
    original = paged._prepare
    count = {"passes": 0}

    def prepare(chunks):
        index = count["passes"]
        count["passes"] += 1
        failure = failures.pop(index, None)
        if failure is SystemExit:
            os._exit(3)
        if failure is not None:
            raise failure
        return original(chunks)

    paged._prepare = prepare

"""What the benchmarks share: the prompts and workloads, random checkpoints built once, percentiles and
timestamps, the machine's description, checking that a web is up, and recording a table in
bench/RESULTS.md. Each benchmark imports this module, never another benchmark."""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

PROMPTS = [
    "This is a creative story about a lighthouse keeper.\n",
    "Once upon a time, in a village by the sea,",
    "从前有一座山，山里有一座庙，",
    "كان يا ما كان في قديم الزمان",
    "def quicksort(items):\n",
    "The history of the printing press begins",
    "Il était une fois un petit chat qui",
    "SELECT name, count(*) FROM users",
]

def random_bloom(model_dir: Path, *, message: str | None = None, **shape: int | float) -> Path:
    """A random BLOOM of ``shape`` (``worker.model.tiny.build_tiny_bloom``'s arguments) in ``model_dir``, built
    once and reused."""
    if (model_dir / "config.json").exists():
        return model_dir
    from worker.model.tiny import build_tiny_bloom

    if message:
        print(message, flush=True)
    return build_tiny_bloom(model_dir, **shape)


def bloom_560m_shape(model_dir: Path) -> Path:
    """The bloom-560m shape with random weights (hidden 1024, 24 layers, 16 heads, vocabulary 250880)."""
    return random_bloom(model_dir, message=f"building a random bloom-560m-shaped checkpoint in {model_dir} (once)",
                        hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880, init_std=0.02, seed=0)


def mid_bloom(model_dir: Path) -> Path:
    """A random BLOOM of 512 hidden, 8 layers (a decode step of some ms on a CPU)."""
    return random_bloom(model_dir, hidden_size=512, n_layer=8, n_head=8)


def chaos_model() -> Path:
    """The tiny random BLOOM the chaos and failover runs use (kept under .models)."""
    return random_bloom(ROOT / ".models" / "chaos-bloom", hidden_size=256, n_layer=4, n_head=4)


def fresh_logs(folder: Path) -> None:
    """An empty log folder for this run's processes."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.log"):
        old.unlink()


def workload(n: int, seed: int = 1234) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(PROMPTS[i % len(PROMPTS)], rng.randint(8, 128)) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def seconds_between(start: str, end: str) -> float:
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def summarise(latencies: list[float], tokens: int, wall: float) -> dict[str, float]:
    """Throughput and latency figures for one setup."""
    return {
        "jobs_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "mean_latency": statistics.mean(latencies),
        "p95_latency": pct(latencies, 95),
        "wall": wall,
        "tokens": tokens,
    }


# The stack's defaults as `make run` has them: tests.support pins float32 for the tests' token-for-token
# comparisons with generate(), and a benchmark measures the default dtype policy instead.
STACK_DEFAULTS = {"BLOOMQ_DTYPE": "auto"}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def report(table: str, record: bool = True) -> None:
    """Print a results table and (unless told not to) append it to bench/RESULTS.md."""
    print(table)
    if record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(table + "\n")


def web_up(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False



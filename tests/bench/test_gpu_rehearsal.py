"""The CPU rehearsal of bench/gpu.py (quick mode), so the run on a GPU machine is not the script's first run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker.model.precision import cpu_dtype

pytestmark = pytest.mark.slow  # a whole benchmark run: left out of make test-fast

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """One quick run on the CPU, stack part included (a real redis-server and worker): its process, its
    tables, and the checkpoint cache it built."""
    work = tmp_path_factory.mktemp("bench-gpu")
    out, cache = work / "gpu.md", work / "models"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--quick", "--cache", str(cache), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    return run, out.read_text() if out.exists() else "", cache


def table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with ``first_column``, as header -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def test_quick_rehearsal_exits_zero_and_writes_every_section(rehearsal):
    run, text, _cache = rehearsal
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for section in ("### 1. The stack", "### 2. Decode step", "Mixed lengths:", "### 3. Prefill", "### Goals"):
        assert section in text
    assert text.strip() in run.stdout  # the tables are printed too
    assert "failed" not in text


# The dtype the rehearsal's engine loads in on this CPU (the auto policy: bf16 with native bf16 instructions).
DTYPE = cpu_dtype("auto").name
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}[DTYPE]


def _checkpoint(cache: Path) -> tuple[dict, int]:
    """The rehearsal's checkpoint as this test reads it: its config and the bytes of its weights in the dtype
    the engine loads them in (stored in fp32)."""
    from safetensors import safe_open

    model = cache / "bench-tiny"
    config = json.loads((model / "config.json").read_text())
    size = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as tensors:
            size += sum(math.prod(tensors.get_slice(name).get_shape()) * ELEMENT_BYTES  # noqa: SIM118
                        for name in tensors.keys())
    return config, size


def test_stack_part_serves_a_job_through_redis_and_a_real_worker(rehearsal):
    _run, text, cache = rehearsal
    assert f"devices=cpu queue=bloomq.bench-tiny dtype={DTYPE}" in text  # the launcher's dry-run plan
    [row] = table(text, "worker")
    assert row["job"] == "succeeded"
    assert (row["device"], row["dtype"]) == ("cpu", DTYPE)
    assert int(row["tokens"]) == 32  # the bench asks for 32 new tokens, end-of-text ignored
    assert int(row["text chars"]) >= 1
    # Waiting in the queue and running on the model are both parts of the time from submission to the result.
    assert float(row["queue s"]) + float(row["model s"]) <= float(row["submit→final s"]) + 0.002
    # The worker it started is gone (its command line names the checkpoint in the cache).
    left = subprocess.run(["pgrep", "-f", str(cache)], capture_output=True, text=True).stdout
    assert left == ""


def test_decode_floor_counts_the_weights_at_the_measured_bandwidth(rehearsal):
    _run, text, cache = rehearsal
    _config, weight_bytes = _checkpoint(cache)
    bandwidth = float(re.search(r"Copy bandwidth: ([0-9.]+) GB/s", text).group(1)) * 1e9
    rows = table(text, "model")
    assert [row["batch"] for row in rows] == ["1", "4"]
    for row in rows:
        assert row["dtype"] == DTYPE
        # The floor moves at least the weights once per step (plus the KV cache) at the copy bandwidth.
        assert float(row["floor ms"]) >= 0.95 * weight_bytes / bandwidth * 1000
        # Every throughput was measured (comparing two timed runs is the benchmark's business, not a test's:
        # on a loaded CPU one tiny run can beat another by more than any fixed margin).
        for column in ("tok/s", "e2e tok/s", "HF tok/s", "HF e2e tok/s"):
            assert 0 < float(row[column]) < float("inf")
    assert float(rows[1]["floor ms"]) >= float(rows[0]["floor ms"])  # four rows' KV cache on top of the weights


def test_mixed_lengths_run_the_same_jobs_both_ways_and_prefill_counts_its_cache(rehearsal):
    _run, text, cache = rehearsal
    mixed = {row["setup"]: row for row in table(text[text.index("Mixed lengths:") :], "model")}
    assert set(mixed) == {"continuous", "static"}
    per_job = {setup: float(row["tok/s"]) / float(row["jobs/s"]) for setup, row in mixed.items()}
    assert per_job["continuous"] == pytest.approx(per_job["static"], rel=0.01)  # the same tokens per job
    for row in mixed.values():
        assert float(row["jobs/s"]) * float(row["wall s"]) == pytest.approx(8, rel=0.1)  # 8 jobs each way
        assert float(row["mean latency s"]) <= float(row["p95 latency s"]) <= float(row["wall s"]) + 0.001
    config, weight_bytes = _checkpoint(cache)
    kv_per_token = 2 * config["n_layer"] * config["hidden_size"] * ELEMENT_BYTES  # keys and values
    prefill = table(text[text.index("### 3. Prefill") :], "model")
    assert {(row["prompt tokens"], row["batch"]) for row in prefill} == {("16", "1"), ("16", "4"), ("32", "1"),
                                                                         ("32", "4")}
    for row in prefill:
        assert float(row["weights MiB"]) == pytest.approx(weight_bytes / 2**20, abs=0.051)
        kv = int(row["prompt tokens"]) * int(row["batch"]) * kv_per_token / 2**20
        assert float(row["KV MiB"]) == pytest.approx(kv, abs=0.051)
    assert len({row["KV budget MiB"] for row in prefill}) == 1  # one budget, measured once after loading


def test_goals_are_reported_from_the_tables_and_a_quick_run_is_not_recorded(rehearsal):
    _run, text, _cache = rehearsal
    goals = {row["goal"]: float(row["measured"].rstrip("×")) for row in table(text, "goal")}
    assert set(goals) == {"batch-1 step ÷ floor", "batch-1 engine step ÷ HF generate step",
                          "continuous ÷ static jobs/s (mixed lengths)"}  # batch 64 is not in a quick run
    batch1 = table(text, "model")[0]
    mixed = {row["setup"]: row for row in table(text[text.index("Mixed lengths:") :], "model")}
    assert goals["batch-1 step ÷ floor"] == pytest.approx(float(batch1["step/floor"]), abs=0.011)
    assert goals["batch-1 engine step ÷ HF generate step"] == pytest.approx(float(batch1["engine/HF step"]),
                                                                            abs=0.011)
    assert goals["continuous ÷ static jobs/s (mixed lengths)"] == pytest.approx(
        float(mixed["continuous"]["jobs/s"]) / float(mixed["static"]["jobs/s"]), abs=0.011)
    assert "bench/gpu.py --device cpu --quick" not in (ROOT / "bench" / "RESULTS.md").read_text()

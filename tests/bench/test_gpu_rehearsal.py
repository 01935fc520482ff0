"""The CPU rehearsal of bench/gpu.py (quick mode), so the run on a GPU machine is not the script's first run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_stack_part_serves_a_job_through_redis_and_a_real_worker(rehearsal):
    _run, text, cache = rehearsal
    assert "devices=cpu queue=bloomq.bench-tiny dtype=float32" in text  # the launcher's dry-run plan
    [row] = table(text, "worker")
    assert row["job"] == "succeeded"
    assert (row["device"], row["dtype"]) == ("cpu", "float32")
    assert int(row["tokens"]) >= 1 and float(row["model s"]) > 0 and float(row["submit→final s"]) > 0
    # The worker it started is gone (its command line names the checkpoint in the cache).
    left = subprocess.run(["pgrep", "-f", str(cache)], capture_output=True, text=True).stdout
    assert left == ""


def test_decode_table_compares_each_batch_with_the_floor_and_hf_generate(rehearsal):
    _run, text, _cache = rehearsal
    rows = table(text, "model")
    assert [row["batch"] for row in rows] == ["1", "4"]
    for row in rows:
        assert row["dtype"] == "float32"
        assert float(row["step ms"]) > 0 and float(row["HF step ms"]) > 0
        assert float(row["floor ms"]) > 0 and float(row["step/floor"]) > 0
        # tokens per second is rows per step: the two columns agree
        assert float(row["tok/s"]) == pytest.approx(int(row["batch"]) * 1000 / float(row["step ms"]), rel=0.02)


def test_mixed_lengths_and_prefill_tables_have_numbers(rehearsal):
    _run, text, _cache = rehearsal
    mixed = {row["setup"]: row for row in table(text[text.index("Mixed lengths:") :], "model")}
    assert set(mixed) == {"continuous", "static"}
    assert all(float(row["jobs/s"]) > 0 and float(row["mean latency s"]) > 0 for row in mixed.values())
    prefill = table(text[text.index("### 3. Prefill") :], "model")
    assert {(row["prompt tokens"], row["batch"]) for row in prefill} == {("16", "1"), ("16", "4"), ("32", "1"),
                                                                         ("32", "4")}
    assert all(float(row["prefill ms"]) > 0 and float(row["KV budget MiB"]) > 0 for row in prefill)


def test_goals_are_reported_and_a_quick_run_is_not_recorded(rehearsal):
    _run, text, _cache = rehearsal
    goals = {row["goal"] for row in table(text, "goal")}
    assert goals == {"batch-1 step ÷ floor", "batch-1 engine step ÷ HF generate step",
                     "continuous ÷ static jobs/s (mixed lengths)"}  # batch 64 is not in a quick run
    assert "bench/gpu.py --device cpu --quick" not in (ROOT / "bench" / "RESULTS.md").read_text()

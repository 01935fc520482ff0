"""The placement planner: where each BLOOM fits, and the launcher's choice, from shapes and card memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config.models import PRESETS, SHAPES
from tests.support import ROOT
from worker.model.planner import PlacementError, choose, options, parse_gpus, refusal


def _choice(model: str, gpus: str):
    count, card = parse_gpus(gpus)
    return choose(options(SHAPES[model], PRESETS[model].max_total_tokens, count, card))


def test_the_registry_knows_every_blooms_size():
    assert SHAPES["bloom"].params == 176_247_271_424  # the published 176B count, from the shape alone
    assert SHAPES["bloom-560m"].params == 559_214_592
    assert SHAPES["bloomz"] == SHAPES["bloom"] and SHAPES["bloomz-7b1-mt"] == SHAPES["bloom-7b1"]
    assert all(PRESETS[name].shape is not None for name in PRESETS)


@pytest.mark.parametrize(("gpus", "quantization", "tensor_parallel"), [
    ("8xA100-80GB", "none", 8),  # 352 GB of bf16 weights: 44 GB per card
    ("2xH200", "int8", 2),  # bf16 does not fit on two; int8 does, and beats int4 on one
    ("1xH200", "int4", 1),
])
def test_bloom_176b_placements(gpus, quantization, tensor_parallel):
    chosen = _choice("bloom", gpus)
    assert (chosen.quantization, chosen.tensor_parallel) == (quantization, tensor_parallel)
    assert chosen.batch_at_max_length >= 1 and chosen.dtype == "bfloat16"


def test_bloom_176b_on_one_a10_is_refused_with_the_reason():
    with pytest.raises(PlacementError, match=r"no placement fits: the smallest \(bfloat16 int4, tensor-parallel 1\)"):
        _choice("bloom", "1xA10-24GB")


def test_a_small_model_gets_one_worker_per_gpu():
    chosen = _choice("bloom-560m", "8xA100-80GB")
    assert (chosen.quantization, chosen.tensor_parallel, chosen.groups) == ("none", 1, 8)


def test_asked_for_placements_that_cannot_fit_are_refused_with_the_numbers():
    count, card = parse_gpus("4xA100-80GB")
    reason = refusal(SHAPES["bloom"], 2048, count, card, "none", 4)
    assert reason is not None and "82.1 GiB of weights on each A100-80GB (80.0 GiB)" in reason
    assert refusal(SHAPES["bloom"], 2048, count, card, "int8", 4) is None
    assert "do not divide" in refusal(SHAPES["bloom"], 2048, 8, card, "none", 3)
    assert "needs 8 GPUs; there are 4" in refusal(SHAPES["bloom"], 2048, count, card, "none", 8)


@pytest.mark.parametrize("spec", ["3xB200", "eight A100", "0xH200"])
def test_unknown_gpu_specs_are_refused(spec):
    with pytest.raises(PlacementError, match="--gpus-spec"):
        parse_gpus(spec)


def test_plan_command_prints_every_option_and_the_choice():
    run = subprocess.run([sys.executable, "-m", "worker", "--model", "bloom", "--plan", "--gpus-spec", "2xH200"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    assert lines[-1] == "chosen: bfloat16 int8, tensor-parallel 2, 1 group(s) (--tensor-parallel 2 --quantize int8)"
    assert sum(1 for line in lines if line.startswith("bfloat16")) == 6  # 3 quantizations x TP 1, 2
    refused = subprocess.run([sys.executable, "-m", "worker", "--model", "bloom", "--plan", "--gpus-spec", "A10"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "refused: no placement fits" in refused.stdout


def test_the_launcher_refuses_a_split_the_heads_do_not_allow_before_loading():
    run = subprocess.run([sys.executable, "-m", "worker", "--model", "bloom-560m", "--gpus", "none",
                          "--tensor-parallel", "3", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert "16 attention heads, which do not divide into a tensor-parallel size of 3" in run.stderr

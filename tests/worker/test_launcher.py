import subprocess
import sys

import pytest

from tests.support import ROOT
from worker.launcher import PlanError, plan_workers


def test_no_gpu_gives_one_cpu_worker():
    plan = plan_workers("bloom-560m", "box", [], "all")
    assert [(p.name, p.cuda_visible_devices, p.device) for p in plan] == [("bloom-560m@box.cpu", None, "cpu")]


@pytest.mark.parametrize("count", [1, 4, 8])
def test_one_worker_per_gpu(count):
    gpus = [str(i) for i in range(count)]
    plan = plan_workers("bloom-7b1", "box", gpus, "all")
    assert [p.cuda_visible_devices for p in plan] == gpus
    assert plan[-1].name == f"bloom-7b1@box.gpu{count - 1}"


def test_explicit_list_and_none():
    gpus = ["0", "1", "2", "3"]
    assert [p.cuda_visible_devices for p in plan_workers("m", "h", gpus, "0,1,3")] == ["0", "1", "3"]
    assert [p.device for p in plan_workers("m", "h", gpus, "none")] == ["cpu"]


@pytest.mark.parametrize(("gpus", "message"), [("5", "does not exist"), ("0,0", "twice"), (",", "comma-separated")])
def test_bad_gpu_lists_are_refused_clearly(gpus, message):
    with pytest.raises(PlanError, match=message):
        plan_workers("m", "h", ["0", "1"], gpus)


def test_dry_run_prints_the_plan_without_starting_anything():
    out = subprocess.run(
        [sys.executable, "-m", "worker", "--model", "bloom-560m", "--gpus", "none", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "bloom-560m@" in out and "device=cpu" in out

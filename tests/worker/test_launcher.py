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


def test_gpu_groups_for_models_larger_than_one_card():
    plan = plan_workers("bloom", "box", [str(i) for i in range(8)], "all", per_worker=4)
    assert [p.cuda_visible_devices for p in plan] == ["0,1,2,3", "4,5,6,7"]
    assert plan[1].name == "bloom@box.gpu4+5+6+7"
    assert [p.cuda_visible_devices for p in plan_workers("m", "h", ["0", "1", "2", "3"], "1,3", 2)] == ["1,3"]
    with pytest.raises(PlanError, match="do not split into groups of 4"):
        plan_workers("bloom", "box", ["0", "1", "2"], "all", per_worker=4)
    with pytest.raises(PlanError, match="at least 1"):
        plan_workers("bloom", "box", ["0"], "all", per_worker=0)


def test_dry_run_prints_the_plan_without_starting_anything():
    out = subprocess.run(
        [sys.executable, "-m", "worker", "--model", "bloom-560m", "--gpus", "none", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "bloom-560m@" in out and "devices=cpu" in out
    assert "queue=bloomq.bloom-560m" in out and "dtype=float32" in out


CHILD = """
import os, pathlib, signal, sys, time
mode = sys.argv[1]
log = pathlib.Path(sys.argv[2])
with log.open("a") as f:
    f.write(f"start {os.getpid()}\\n")
if mode == "fail-at-load":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: (log.open("a").write("drained\\n"), sys.exit(0)))
pathlib.Path(os.environ["BLOOMQ_READY_FILE"]).touch()
if mode == "crash-once" and log.read_text().count("start") == 1:
    time.sleep(0.3)
    os._exit(9)
while True:
    time.sleep(0.1)
"""


def _supervise(tmp_path, mode):
    """A supervisor over a stand-in child process that behaves as ``mode`` says."""
    from worker.launcher import Supervisor, WorkerPlan

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "child.log"
    plan = [WorkerPlan(name="m@h.cpu", cuda_visible_devices=None)]
    supervisor = Supervisor(plan, "m", tmp_path, command=lambda child: [sys.executable, str(script), mode, str(log)])
    return supervisor, log


def test_a_worker_that_dies_is_restarted_and_a_signal_drains_it(tmp_path):
    import signal
    import threading
    import time

    supervisor, log = _supervise(tmp_path, "crash-once")
    timer = threading.Timer(3.0, lambda: supervisor.stop(signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    assert supervisor.run(install_signals=False) == 0
    text = log.read_text()
    assert text.count("start") == 2  # died once, restarted once (after a 1 s backoff)
    assert text.rstrip().endswith("drained")  # the stop signal reached the restarted child
    assert time.monotonic() - started < 10


def test_a_worker_that_never_gets_ready_stops_the_launcher_with_its_status(tmp_path):
    supervisor, log = _supervise(tmp_path, "fail-at-load")
    assert supervisor.run(install_signals=False) == 3
    assert log.read_text().count("start") == 1  # not restarted: it would only fail again

import subprocess
import sys

import pytest

from tests.support import ROOT
from worker.launcher import PlanError, plan_workers
from worker.model.precision import cpu_dtype
from worker.supervisor import Supervisor, WorkerPlan


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
    expected = cpu_dtype("auto")  # what this machine's CPU flags give: bf16 with native bf16, else fp32
    assert "queue=bloomq.bloom-560m" in out and f"dtype={expected.name} ({expected.reason})" in out


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


def test_tensor_parallel_groups():
    plan = plan_workers("bloom", "box", [str(i) for i in range(8)], "all", tensor_parallel=4)
    assert [(p.cuda_visible_devices, p.ranks) for p in plan] == [("0,1,2,3", 4), ("4,5,6,7", 4)]
    assert plan_workers("m", "h", [], "all", tensor_parallel=2) == [WorkerPlan("m@h.cpu", None, ranks=2)]
    with pytest.raises(PlanError, match="--tensor-parallel 4: 3 GPU"):
        plan_workers("bloom", "box", ["0", "1", "2"], "all", tensor_parallel=4)
    with pytest.raises(PlanError, match="choose one"):
        plan_workers("bloom", "box", ["0", "1"], "all", per_worker=2, tensor_parallel=2)


GROUP_CHILD = """
import os, pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])
rank = os.environ["RANK"]
with log.open("a") as f:
    f.write(f"start {rank} {os.environ['WORLD_SIZE']} {os.environ['MASTER_PORT']}\\n")
if rank == "0":
    signal.signal(signal.SIGTERM, lambda *_: (log.open("a").write("drained 0\\n"), sys.exit(0)))
    pathlib.Path(os.environ["BLOOMQ_READY_FILE"]).touch()
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a follower leaves when its leader is gone
    if log.read_text().count("start 1") == 1:
        time.sleep(0.5)
        os._exit(9)  # the first rank 1 dies
parent = os.getppid()
while True:
    time.sleep(0.1)
    if rank != "0" and "drained 0" in log.read_text():
        sys.exit(0)
"""


def test_a_rank_that_dies_restarts_its_whole_group_and_a_drain_reaches_the_leader(tmp_path):
    import signal
    import threading

    script = tmp_path / "rank.py"
    script.write_text(GROUP_CHILD)
    log = tmp_path / "ranks.log"
    supervisor = Supervisor([WorkerPlan("m@h.cpu", None, ranks=2)], "m", tmp_path,
                            command=lambda plan: [sys.executable, str(script), str(log)])
    supervisor.group_grace = 0.5  # this stand-in leader does not notice its lost rank: it is killed
    threading.Timer(5.0, lambda: supervisor.stop(signal.SIGTERM)).start()
    assert supervisor.run(install_signals=False) == 0
    starts = [line.split() for line in log.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 4  # rank 1 died: both ranks started again
    first, second = starts[:2], starts[2:]
    assert sorted(s[1] for s in first) == sorted(s[1] for s in second) == ["0", "1"]
    assert {s[2] for s in starts} == {"2"}
    ports = [{s[3] for s in first}, {s[3] for s in second}]
    assert len(ports[0]) == len(ports[1]) == 1 and ports[0] != ports[1]  # one rendezvous port per start
    assert log.read_text().count("drained 0") == 1  # the stop went to the leader, which told the other

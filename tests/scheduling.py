"""How ``make test`` spreads the suite over its processes (pytest-xdist, ``--dist loadfile``).

xdist's own loadfile sends whole files, the files with the most tests first, and gives a process more files
while it still has tests queued. Here the costly end-to-end tests have one test a file or a few, so they came
last, and a process could hold several of them while the other ran out of work. This scheduler keeps the
unit of loadfile (one file, in one process, its module fixtures started once) with three changes:

- the tests that use a shared stack (``tests/e2e/conftest.py``) are one unit, so the stack starts once;
- in files whose every test starts and kills its own stack, each test is a unit of its own;
- the costliest units go first (seconds measured on two cores, below), and a process gets its next unit only
  once it is down to its last test (the one xdist holds back until it knows what follows).
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

E2E = "tests/e2e/"

# Units named for a shared stack: every test (or file) that uses it.
SHARED = {
    f"{E2E}test_pipeline.py": "the shared tiny stack",
    f"{E2E}test_engine.py": "the shared tiny stack",
    f"{E2E}test_batches.py": "the shared tiny stack",
    f"{E2E}test_faults.py::test_poisoned_messages": "the shared tiny stack",
    f"{E2E}test_live.py": "the shared slow stack",
    f"{E2E}test_watchers.py": "the shared slow stack",
    f"{E2E}test_browser.py": "the shared slow stack",
    f"{E2E}test_isolation.py::test_hostile_requests": "the shared slow stack",
}

# Files whose tests each start (and kill, restart, reconfigure) a stack of their own.
ONE_BY_ONE = {f"{E2E}{name}.py" for name in ("test_faults", "test_isolation", "test_scaleout", "test_failover")}

# Seconds a unit took alone on two cores; units not named here count a tenth of a second a test.
COST = {
    "the shared tiny stack": 120,
    "the shared slow stack": 130,
    f"{E2E}test_netns.py": 70,
    f"{E2E}test_tensor_parallel.py": 50,
    f"{E2E}test_chaos.py": 40,
    f"{E2E}test_secured.py": 20,
    f"{E2E}test_compat.py": 25,
    f"{E2E}test_run_stack.py": 15,
    "tests/worker/model/test_tensor_parallel.py": 40,
    "tests/bench/test_gpu_rehearsal.py": 20,
    "tests/worker/engine/test_flex.py": 25,  # inductor compiles FlexAttention for the CPU
    "tests/worker/engine/test_paged.py": 15,
}
# The tests of the ONE_BY_ONE files, by the start of their names.
COST.update({
    f"{E2E}test_faults.py::test_worker_killed": 30,
    f"{E2E}test_faults.py::test_redis_restart": 25,
    f"{E2E}test_faults.py::test_a_model_that_fails": 10,
    f"{E2E}test_isolation.py::test_a_redis_pause": 35,
    f"{E2E}test_isolation.py::test_a_fatal_device_error": 30,
    f"{E2E}test_scaleout.py::test_a_killed_worker": 35,
    f"{E2E}test_scaleout.py::test_jobs_route": 20,
    f"{E2E}test_scaleout.py::test_sigterm_drains": 15,
    f"{E2E}test_failover.py::test_master_killed": 30,
    f"{E2E}test_failover.py::test_old_master": 30,
})


def unit_of(nodeid: str) -> str:
    """The unit a test runs in: a shared stack's name, the test itself, or its file."""
    for prefix, name in SHARED.items():
        if nodeid.startswith(prefix):
            return name
    path = nodeid.split("::", 1)[0]
    return nodeid if path in ONE_BY_ONE else path


def cost_of(unit: str, tests: int) -> float:
    for prefix, seconds in COST.items():
        if unit.startswith(prefix):
            return seconds
    return 0.1 * tests


class CostScheduling(LoadScopeScheduling):
    """loadfile with shared-stack units, single-test units for the fault files, costliest first."""

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node) -> None:
        unit = max(self.workqueue, key=lambda u: cost_of(u, len(self.workqueue[u])))
        tests = self.workqueue.pop(unit)
        self.assigned_work.setdefault(node, {})[unit] = tests
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(nodeid) for nodeid, done in tests.items() if not done])

    def _reschedule(self, node) -> None:
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)

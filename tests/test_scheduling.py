"""The units of tests/scheduling.py name tests that exist, and every test on a shared stack runs in its unit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.scheduling import COST, ONE_BY_ONE, SHARED, cost_of, unit_of

ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = {"stack": "the shared tiny stack", "slow_stack": "the shared slow stack"}


def _functions(path: str) -> dict[str, list[str]]:
    """The functions of a file, each with the names of its arguments (a test's fixtures)."""
    tree = ast.parse((ROOT / path).read_text())
    return {node.name: [a.arg for a in node.args.args] for node in tree.body if isinstance(node, ast.FunctionDef)}


def _tests(path: str) -> dict[str, list[str]]:
    return {name: args for name, args in _functions(path).items() if name.startswith("test_")}


@pytest.mark.parametrize("key", sorted({*SHARED, *ONE_BY_ONE, *(k for k in COST if k.startswith("tests/"))}))
def test_every_name_in_the_tables_matches_a_test(key):
    path, _, prefix = key.partition("::")
    assert (ROOT / path).is_file(), key
    assert any(name.startswith(prefix) for name in _tests(path)), f"{key}: no test of that name"


def test_every_test_on_a_shared_stack_runs_in_that_stacks_unit():
    for path in sorted(ROOT.glob("tests/e2e/test_*.py")):
        relative = str(path.relative_to(ROOT))
        own = set(_functions(relative))  # a file's own fixture of that name is not the shared one
        for name, fixtures in _tests(relative).items():
            for fixture in set(fixtures) & set(SHARED_FIXTURES) - own:
                assert unit_of(f"{relative}::{name}") == SHARED_FIXTURES[fixture], f"{relative}::{name}"


def test_units_are_files_but_for_shared_stacks_and_the_fault_tests():
    assert unit_of("tests/web/test_keys.py::test_a[x]") == "tests/web/test_keys.py"
    assert unit_of("tests/e2e/test_pipeline.py::test_jobs") == "the shared tiny stack"
    fault = "tests/e2e/test_scaleout.py::test_sigterm_drains_the_launcher_after_its_running_job"
    assert unit_of(fault) == fault
    assert cost_of(fault, 1) == COST["tests/e2e/test_scaleout.py::test_sigterm_drains"]
    assert cost_of("tests/web/test_keys.py", 20) == pytest.approx(2.0)  # unnamed units: by their size

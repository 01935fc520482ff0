"""The worker's layers, read from its own imports: the engine knows no queue, the model knows no engine, and
no first-party module imports another that imports it back."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

from jobs.schema import GenerateParameters, JobOutput
from tests.support import ROOT
from worker.engine.outputs import Completion
from worker.engine.params import SamplingParams

FIRST_PARTY = ("bench", "cli", "config", "jobs", "web", "worker")
QUEUE = ("celery", "kombu", "redis", "jobs", "web", "flask")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it is imported (function-local imports are lazy: not counted)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules (and packages) it imports at import time."""
    modules = {module_name(p): p for pkg in FIRST_PARTY for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in top_level_imports(path) if t in modules}
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for target in list(targets):
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules)
        # A module's own packages are being imported already when it runs: not an edge.
        edges[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one chain of imports that leads to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in sorted(edges.get(current, ())):
            if target not in chains:
                chains[target] = chains[current] + [target]
                todo.append(target)
    return chains


def third_party_imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in top_level_imports(path)} - set(FIRST_PARTY)


def test_the_engine_imports_nothing_of_the_queue_directly_or_through_another_module():
    edges = graph()
    for start in [name for name in edges if name == "worker.engine" or name.startswith("worker.engine.")]:
        for module, chain in reachable(edges, start).items():
            path = ROOT / (module.replace(".", "/") + ".py")
            path = path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"
            assert not module.startswith(("jobs", "web", "cli", "bench")), " -> ".join(chain)
            assert module.startswith(("worker.engine", "worker.model", "config")) or module == "worker", (
                " -> ".join(chain)
            )
            assert not third_party_imports(path) & set(QUEUE), (" -> ".join(chain), third_party_imports(path))


def test_the_model_package_imports_neither_the_engine_nor_the_process():
    edges = graph()
    for start in [name for name in edges if name.startswith("worker.model")]:
        for module, chain in reachable(edges, start).items():
            assert module.startswith(("worker.model", "config")) or module == "worker", " -> ".join(chain)


def test_importing_the_engine_loads_no_queue_module():
    code = (
        "import sys, worker.engine, worker.model.loading, worker.model.tiny; "
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {QUEUE!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_no_first_party_module_imports_one_that_imports_it_back():
    edges = graph()
    for start in edges:
        for module, chain in reachable(edges, start).items():
            if module != start:
                assert start not in edges.get(module, ()), " -> ".join(chain + [start])


def test_the_engines_parameters_and_completion_have_the_job_contracts_fields():
    # worker.runner passes a job's parameters to the engine field by field, and its completion back.
    assert {f.name for f in dataclasses.fields(SamplingParams)} == set(GenerateParameters.model_fields)
    assert {f.name for f in dataclasses.fields(Completion)} == set(JobOutput.model_fields)

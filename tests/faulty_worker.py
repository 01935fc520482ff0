"""A test build of the worker: the real launcher and worker process, with a CUDA-style fatal error
injected into the engine for any decode step whose batch holds a prompt containing ``POISON``.

    python -m tests.faulty_worker [--model REF]          # supervised, as ``python -m worker --gpus none``
    python -m tests.faulty_worker serve [worker.serve args]

On a real GPU such an error (a device-side assert, an illegal memory access) poisons the CUDA context;
here it is raised with the same message, which is all the engine can go by.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

POISON = "POISON-PILL"
FAULT = "CUDA error: device-side assert triggered (injected by the test build)"


def _install_fault() -> None:
    from worker.engine.core import Engine

    real_forward = Engine._forward

    class _DeviceAssert:
        def forward(self, chunks):
            raise RuntimeError(FAULT)

    def forward(self, planned):
        if not any(POISON in item.seq.prompt and len(item.seq.tokens) >= 2 for item in planned):
            return real_forward(self, planned)
        paged, self.paged = self.paged, _DeviceAssert()
        try:
            return real_forward(self, planned)
        finally:
            self.paged = paged

    Engine._forward = forward


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        _install_fault()
        from worker.serve import main as serve

        return serve(argv[1:])
    from config.models import resolve_model
    from config.settings import Settings
    from worker.launcher import plan_workers
    from worker.supervisor import Supervisor

    parser = argparse.ArgumentParser(prog="python -m tests.faulty_worker")
    parser.add_argument("--model")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    ref = args.model or settings.model
    plan = plan_workers(resolve_model(ref).name, settings.host_name, [], "none")

    def command(item) -> list[str]:
        return [sys.executable, "-m", "tests.faulty_worker", "serve", "--model", ref, "--device", item.device,
                "--name", item.name]

    with tempfile.TemporaryDirectory(prefix="bloomq-faulty-") as state:
        return Supervisor(plan, ref, Path(state), command=command).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One worker process: load the model, then consume the model's queue.

    python -m worker.serve --model REF [--device auto|cpu|cuda] [--name NODE]

Normally started by the launcher (``python -m worker``), which sets ``CUDA_VISIBLE_DEVICES`` first.
The model is loaded before the process subscribes to its queue; a load failure exits non-zero with the
original error and leaves the jobs queued.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from config.models import ModelRegistry, ModelSpec
from config.settings import Settings
from jobs.celery_app import make_celery
from jobs.store import JobStore, connect
from jobs.workers import WorkerDirectory, WorkerInfo

log = logging.getLogger("bloomq.worker")


class Heartbeat:
    """Refreshes this worker's announcement in Redis until stopped."""

    def __init__(self, directory: WorkerDirectory, info: WorkerInfo, interval: float) -> None:
        self.directory = directory
        self.info = info
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bloomq-heartbeat", daemon=True)

    def start(self) -> None:
        """Announce now and keep announcing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop announcing and withdraw the record."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)
        try:
            self.directory.withdraw(self.info.name)
        except Exception:  # Redis may be the reason we are stopping
            log.warning("could not withdraw worker record %s", self.info.name, exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.directory.announce(self.info, ttl_seconds=self.interval * 3)
            except Exception:
                log.warning("heartbeat to Redis failed; retrying", exc_info=True)
            self._stop.wait(self.interval)


def default_worker_name(model: str, device: str) -> str:
    """``model@host.device``, e.g. ``bloom-560m@gpu-box-1.gpu0``."""
    return f"{model}@{socket.gethostname()}.{device}"


def resolve_spec(settings: Settings, ref: str) -> ModelSpec:
    """The registry entry for ``ref`` (a name, hub id or directory)."""
    registry = ModelRegistry((ref, *settings.model_refs))
    spec = registry.get(ref)
    assert spec is not None  # ``ref`` was registered just above
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.serve", description="Run one bloomq worker process.")
    parser.add_argument("--model", help="registry name, hub id or local directory (default: BLOOMQ_MODEL)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--name", help="Celery node name (default: model@host.device)")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    spec = resolve_spec(settings, args.model or settings.model)

    # torch is imported only here, after the launcher has set CUDA_VISIBLE_DEVICES.
    from worker.engine import Engine, EngineConfig
    from worker.loading import load_model, pick_device
    from worker.tasks import JobRunner, register_tasks

    # A load failure propagates: the process exits non-zero with the original error, before it has
    # subscribed to the queue, so the model's jobs stay queued for a worker that can serve them.
    device = pick_device(args.device)
    loaded = load_model(spec, device, settings.dtype)
    device_label = "cpu" if device.type == "cpu" else "gpu" + os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    name = args.name or default_worker_name(spec.name, device_label)

    client = connect(settings.redis_url)
    engine = Engine(
        loaded,
        spec,
        EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_batch_slots=settings.max_batch_total_tokens,
            max_wait_seconds=settings.batch_wait_ms / 1000,
        ),
    )
    log.info("engine: up to %d jobs per batch, %d KV token slots", settings.max_batch_size, engine.max_slots)
    runner = JobRunner(JobStore(client, settings.job_retention_seconds), engine, name)
    app = make_celery(settings)
    register_tasks(app, runner)

    info = WorkerInfo(
        name=name,
        model=spec.name,
        host=socket.gethostname(),
        device=str(device) if device.type == "cpu" else f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '0')}",
        dtype=str(loaded.dtype).removeprefix("torch."),
        pid=os.getpid(),
        batch_capacity=settings.max_batch_size,
    )
    heartbeat = Heartbeat(WorkerDirectory(client), info, settings.heartbeat_seconds)

    from celery.signals import worker_ready

    # Announce only once the consumer is subscribed, so "live" means "will take a job now".
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    log.info("worker %s serving %s on queue %s", name, spec.name, spec.queue)
    try:
        app.worker_main(
            [
                "worker",
                # Threads, never a fork: the model is already loaded (maybe on CUDA) in this process. Each
                # thread hands its job to the one engine thread, which batches them.
                "--pool=threads",
                f"--concurrency={settings.max_batch_size}",
                f"--queues={spec.queue}",
                f"--hostname={name}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        heartbeat.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One worker process: load the model, then consume the model's queue.

    python -m worker.serve --model REF [--device auto|cpu|cuda] [--name NODE]

Normally started by the launcher (``python -m worker``), which sets ``CUDA_VISIBLE_DEVICES`` first.
The model is loaded before the process subscribes to its queue; a load failure exits non-zero with the
original error and leaves the jobs queued.

In a tensor-parallel group (``WORLD_SIZE`` > 1, set by the launcher) every rank loads its own slices;
rank 0 then serves as above, leading the group; the other ranks only follow its passes
(``worker.model.group.follow``) and never talk to Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from config.logs import configure_logging
from config.models import ModelRegistry, ModelSpec
from config.settings import Settings
from jobs.celery_app import make_celery
from jobs.connection import connect
from jobs.metrics import record_batch_sizes
from jobs.outbox import Outbox
from jobs.queues import BatchQueue, enqueue
from jobs.schema import Job
from jobs.store import JobStore
from jobs.webhooks import WebhookSender
from jobs.workers import WorkerDirectory, WorkerInfo
from worker.feeder import BatchFeeder, batch_rows
from worker.liveness import CancelListener, Heartbeat, process_instance
from worker.recovery import DeadlineExpiry, OrphanRecovery
from worker.supervisor import READY_FILE_ENV, RESTARTS_ENV

log = logging.getLogger("bloomq.worker")

WEBHOOK_THREADS = 2  # the webhook dispatcher's own pool: a slow receiver never takes a thread that feeds the batch
# A claimed webhook delivery comes back to the outbox after this many delivery deadlines: long after a live
# claimer has finished or given up, soon after a dead one would have.
WEBHOOK_LEASE_DEADLINES = 4
DEVICE_FAULT_EXIT = 70  # exit status after a fatal device error (the launcher restarts the process)


def default_worker_name(model: str, host: str, device: str) -> str:
    """``model@host.device``, e.g. ``bloom-560m@gpu-box-1.gpu0``."""
    return f"{model}@{host}.{device}"


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
    configure_logging(settings.log_level, settings.log_format, "worker")
    spec = resolve_spec(settings, args.model or settings.model)

    # torch is imported only here, after the launcher has set CUDA_VISIBLE_DEVICES.
    from worker.engine.capacity import EngineConfig, paged_model
    from worker.engine.core import Engine
    from worker.model.group import Group, GroupEnv, GroupLost, follow
    from worker.model.loading import load_model, pick_device
    from worker.runner import JobRunner
    from worker.tasks import WebhookDispatcher, register_tasks

    # A load failure propagates: the process exits non-zero with the original error, before it has
    # subscribed to the queue, so the model's jobs stay queued for a worker that can serve them.
    place = GroupEnv.from_env()
    device = pick_device(args.device, place.local_rank)
    loaded = load_model(spec, device, settings.dtype, place.rank, place.world, settings.quantize)
    engine_config = EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_slots=settings.max_batch_total_tokens,
        max_wait_seconds=settings.batch_wait_ms / 1000,
        step_tokens=settings.step_tokens,
        block_size=settings.kv_block_tokens,
        prefix_caching=settings.prefix_caching,
        attention=settings.attention,
    )
    group = None
    weights, peaks = [loaded.weights_bytes], [loaded.load_peak_bytes]
    if place.world > 1:
        group = Group(place, device, settings.group_timeout_seconds)
        weights, peaks = map(list, zip(*group.share((loaded.weights_bytes, loaded.load_peak_bytes)), strict=True))
        if place.rank > 0:
            # Only rank 0 answers signals (it drains, then tells the others to stop); a terminal's Ctrl-C
            # reaches every process, and a follower leaving first would fail rank 0's running jobs.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                follow(paged_model(loaded, spec, engine_config, group)[1], group)
            except GroupLost as exc:
                log.critical("rank %d of %d: %s; exiting", place.rank, place.world, exc)
                return DEVICE_FAULT_EXIT
            group.close()
            return 0
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    name = args.name or default_worker_name(spec.name, settings.host_name, "cpu" if device.type == "cpu" else f"gpu{gpu}")

    def on_device_fault(exc: BaseException) -> None:
        # The CUDA context is unusable: hand the running jobs back (each now suspected, so it runs alone
        # next time) and exit at once, without running Celery's shutdown on a broken device.
        try:
            runner.hand_back_after_device_fault(exc)
        finally:
            log.critical("exiting after a fatal device error: %s", exc)
            logging.shutdown()
            os._exit(DEVICE_FAULT_EXIT)

    engine = Engine(loaded, spec, engine_config, on_fatal=on_device_fault, group=group)
    log.info("engine: %s (%s), %s attention, up to %d jobs per batch, %d KV token slots in blocks of %d, %d tokens "
             "per step, prefix caching %s", str(loaded.dtype).removeprefix("torch."), loaded.dtype_reason,
             engine.paged.attention, settings.max_batch_size, engine.max_slots, settings.kv_block_tokens,
             engine.step_tokens, "on" if settings.prefix_caching else "off")
    client = connect(settings.redis_url, settings.redis_sentinel_master)
    store = JobStore(client, settings.job_retention_seconds)
    app = make_celery(settings)
    directory = WorkerDirectory(client)
    instance = process_instance(name)

    batch_queue = BatchQueue(client)

    def requeue(job: Job) -> None:
        enqueue(app, batch_queue, job)

    replicas = ((settings.redis_min_replicas, settings.redis_replica_wait_seconds)
                if settings.redis_min_replicas else None)
    runner = JobRunner(store, engine, name, instance=instance, requeue=requeue,
                       result_patience=settings.result_patience_seconds, replicas=replicas)
    register_tasks(app, runner)
    sender = WebhookSender(store, settings.webhook_secret, settings.webhook_allow,
                           timeout=settings.webhook_timeout_seconds)
    webhooks = WebhookDispatcher(Outbox(client), sender, WEBHOOK_THREADS,
                                 lease_seconds=WEBHOOK_LEASE_DEADLINES * settings.webhook_timeout_seconds)

    info = WorkerInfo(
        name=name,
        instance=instance,
        model=spec.name,
        source=spec.source,
        max_input_tokens=spec.max_input_tokens,
        max_total_tokens=spec.max_total_tokens,
        host=settings.host_name,
        device="cpu" if device.type == "cpu" else f"cuda:{gpu}",
        devices=[] if device.type == "cpu" else gpu.split(","),
        dtype=str(loaded.dtype).removeprefix("torch."),
        dtype_reason=loaded.dtype_reason,
        pid=os.getpid(),
        batch_capacity=settings.max_batch_size,
        kv_blocks=engine.pool.num_blocks,
        kv_block_tokens=engine.pool.block_size,
        tensor_parallel=place.world,
        quantization=loaded.quantization,
        attention=engine.paged.attention,
        weights_bytes=weights,
        load_peak_bytes=peaks,
        restarts=int(os.environ.get(RESTARTS_ENV, "0") or 0),
    )

    def current_info() -> WorkerInfo:
        # Each heartbeat also hands the batch sizes of the steps since the last one to the shared metrics.
        record_batch_sizes(client, spec.name, engine.take_batch_sizes())
        prefix = engine.prefix_counters
        return info.model_copy(update={"jobs_running": engine.load, "prefills": engine.prefills,
                                       "memory_bytes": engine.memory_in_use(), "kv_blocks_in_use": engine.pool.held,
                                       "kv_blocks_cached": engine.pool.cached,
                                       "prompt_tokens_reused": prefix["reused"],
                                       "prompt_tokens_computed": prefix["computed"]})

    heartbeat = Heartbeat(directory, current_info, settings.heartbeat_seconds)
    feeder = BatchFeeder(batch_queue, spec.name, runner, batch_rows(settings.max_batch_size))
    # Started in this order (announced before taking any batch line); stopped feeder first, so its lines
    # finish while this worker still announces itself and no reaper takes them.
    background = [
        heartbeat,
        feeder,
        CancelListener(client, runner.cancel),
        DeadlineExpiry(store),
        OrphanRecovery(
            store,
            directory,
            requeue,
            interval=settings.heartbeat_seconds,
            instance=instance,
            trust_after=heartbeat.ttl,
            stuck_grace=settings.stuck_grace_seconds,
            lost_delivery_after=settings.lost_delivery_seconds,
        ),
        webhooks,
    ]

    from celery.signals import worker_ready

    def on_ready(**_: object) -> None:
        # Announce only once the consumer is subscribed, so "live" means "will take a job now".
        for item in background:
            item.start()
        ready_file = os.environ.get(READY_FILE_ENV)
        if ready_file:
            Path(ready_file).touch()

    worker_ready.connect(on_ready, weak=False)
    log.info("worker %s serving %s on queue %s", name, spec.name, spec.queue)
    try:
        app.worker_main(
            [
                "worker",
                # Threads, never a fork: the model is already loaded (maybe on CUDA) in this process. Each
                # thread hands its job to the one engine thread, which batches them.
                "--pool=threads",
                # One thread per batch row.
                f"--concurrency={settings.max_batch_size}",
                # Interactive jobs only; batch lines come through the batch feeder instead, so they never take
                # these threads, and webhooks through the dispatcher (the outbox in Redis).
                f"--queues={spec.queue}",
                f"--hostname={name}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        for item in [feeder, *(item for item in background if item is not feeder)]:
            item.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

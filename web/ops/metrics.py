"""``/metrics``: Prometheus text built from the Redis-backed job metrics and live-worker records."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from jobs import metrics as job_metrics
from jobs.usage import read_totals
from web.services.jobs import JobService

HELP = {
    "queue_seconds": "Seconds from submission to the first start",
    "inference_seconds": "Seconds of model time per job",
    "end_to_end_seconds": "Seconds from submission to the final result",
    "generated_tokens": "Tokens generated per job",
    "batch_size": "Rows in the batch, per decode step",
    "time_to_first_token_seconds": "Seconds from submission to the first token",
    "seconds_per_token": "Seconds of model time per generated token, per job",
}


class RedisCollector:
    """Reads the shared figures at scrape time."""

    def __init__(self, service: JobService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        client = self.service.store.redis
        submitted, finished = job_metrics.read_counters(client)
        counter = CounterMetricFamily("bloomq_jobs_submitted", "Jobs accepted", labels=["model"])
        for model, value in sorted(submitted.items()):
            counter.add_metric([model], value)
        yield counter
        counter = CounterMetricFamily("bloomq_jobs_finished", "Jobs that reached a final state",
                                      labels=["model", "status"])
        for (model, status), value in sorted(finished.items()):
            counter.add_metric([model, status], value)
        yield counter
        for name, bounds in job_metrics.HISTOGRAMS.items():
            family = HistogramMetricFamily(f"bloomq_{name}", HELP[name], labels=["model"])
            for model, fields in sorted(job_metrics.read_histogram(client, name).items()):
                cumulative, buckets = 0.0, []
                for bound in bounds:
                    cumulative += fields.get(str(bound), 0.0)
                    buckets.append(("+Inf" if bound == job_metrics.INF else f"{bound:g}", cumulative))
                family.add_metric([model], buckets, sum_value=fields.get("sum", 0.0))
            yield family
        models = self.service.models()
        depth = GaugeMetricFamily("bloomq_queue_depth", "Jobs waiting in a model's queue", labels=["model"])
        workers = GaugeMetricFamily("bloomq_live_workers", "Worker processes announcing themselves", labels=["model"])
        for model in models:
            depth.add_metric([model["name"]], model["queue_depth"])
            workers.add_metric([model["name"]], model["workers"])
        yield depth
        yield workers
        memory = GaugeMetricFamily("bloomq_worker_memory_bytes", "Device memory in use (GPU) or resident memory (CPU)",
                                   labels=["worker", "model", "device"])
        running = GaugeMetricFamily("bloomq_worker_jobs_running", "Jobs in a worker's engine", labels=["worker", "model"])
        labels = ["worker", "model"]
        blocks = GaugeMetricFamily("bloomq_worker_kv_blocks", "Blocks in a worker's paged KV pool", labels=labels)
        in_use = GaugeMetricFamily("bloomq_worker_kv_blocks_in_use", "KV blocks held by running jobs", labels=labels)
        cached = GaugeMetricFamily("bloomq_worker_kv_blocks_cached", "KV blocks holding an indexed prompt prefix",
                                   labels=labels)
        reused = CounterMetricFamily("bloomq_worker_prompt_tokens_reused",
                                     "Prompt tokens taken from the prefix cache since the worker started", labels=labels)
        computed = CounterMetricFamily("bloomq_worker_prompt_tokens_computed",
                                       "Prompt tokens computed since the worker started", labels=labels)
        for worker in self.service.live_workers():
            memory.add_metric([worker.instance, worker.model, worker.device], worker.memory_bytes)
            who = [worker.instance, worker.model]
            running.add_metric(who, worker.jobs_running)
            blocks.add_metric(who, worker.kv_blocks)
            in_use.add_metric(who, worker.kv_blocks_in_use)
            cached.add_metric(who, worker.kv_blocks_cached)
            reused.add_metric(who, worker.prompt_tokens_reused)
            computed.add_metric(who, worker.prompt_tokens_computed)
        yield from (memory, running, blocks, in_use, cached, reused, computed)
        if self.service.settings.metrics_per_key:
            yield from _per_key(client)


def _per_key(client) -> Iterator[Metric]:  # noqa: ANN001 - a Redis client
    """Tokens and jobs per API key (owner id) and model: a series per key, so only behind a setting."""
    tokens = CounterMetricFamily("bloomq_key_tokens", "Tokens of a key's finished jobs",
                                 labels=["key", "model", "kind"])
    jobs = CounterMetricFamily("bloomq_key_jobs", "A key's finished jobs", labels=["key", "model"])
    for (owner, model, kind), amount in sorted(read_totals(client).items()):
        if kind == "jobs":
            jobs.add_metric([owner, model], amount)
        else:
            tokens.add_metric([owner, model, kind.removesuffix("_tokens")], amount)
    yield from (tokens, jobs)


def render_metrics(service: JobService, accept: str | None) -> tuple[bytes, str]:
    """The exposition in the format the scraper's ``Accept`` header asks for (Prometheus's text format, or
    OpenMetrics), and its Content-Type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(service))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type

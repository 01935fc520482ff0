"""The whole stack as real processes: redis-server, the worker launcher, gunicorn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from tests.conftest import ARTIFACTS, built_once
from tests.support import (
    WORKER_COMMAND,
    Proc,
    RedisServer,
    SentinelCluster,
    free_port,
    live_workers,
    start_web,
    start_worker,
    wait_for,
)


@dataclass
class Stack:
    redis: RedisServer | SentinelCluster
    model: str
    logs: Path
    web: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """Credentials for the API when the stack runs with API keys."""
        keys = self.env.get("BLOOMQ_API_KEYS") or self.env.get("BLOOMQ_OPERATOR_KEYS")
        return {"Authorization": f"Bearer {keys.split(',')[0]}"} if keys else {}

    def start_web(self) -> None:
        self.web = start_web(self.redis.url, self.model, self.logs / "web.log", self.port, **self.env)
        wait_for(lambda: _up(self.url), timeout=30, what="the web to answer /healthz")

    def start_worker(self, wait: bool = True, model: str | None = None, command: tuple[str, ...] = WORKER_COMMAND
                     ) -> Proc:
        log = self.logs / f"worker-{len(self.workers)}.log"
        worker = start_worker(self.redis.url, model or self.model, log, command, **self.env)
        self.workers.append(worker)
        if wait:
            self.wait_for_workers()
        return worker

    def wait_for_workers(self) -> None:
        """Until every live launcher's worker has announced itself (start several with ``wait=False``
        first, and they load side by side)."""
        expected = sum(1 for w in self.workers if w.alive())
        wait_for(lambda: live_workers(self.url, self.headers) >= expected, timeout=90,
                 what="the workers to announce themselves")

    def wait_until_idle(self, timeout: float = 120) -> None:
        """Until no job is queued, and a heartbeat sent after the queue was seen empty reports no job running
        (a shared stack may still be finishing an earlier test's jobs; a test that reads a worker's counters
        waits for this first)."""
        empty_since: list[datetime] = []

        def idle() -> bool:
            models = requests.get(f"{self.url}/api/v1/models", headers=self.headers, timeout=5).json()["models"]
            if any(m["queue_depth"] for m in models):
                empty_since.clear()
                return False
            empty_since[:] = empty_since or [datetime.now(UTC)]
            workers = requests.get(f"{self.url}/api/v1/workers", headers=self.headers, timeout=5).json()["workers"]
            return all(w["jobs_running"] == 0 and datetime.fromisoformat(w["last_seen"]) > empty_since[0]
                       for w in workers)

        wait_for(idle, timeout=timeout, interval=0.2, what="the stack to be idle")

    def submit(self, inputs: str, **body) -> dict:
        response = requests.post(f"{self.url}/api/v1/jobs", json={"inputs": inputs, **body}, headers=self.headers,
                                 timeout=10)
        assert response.status_code == 202, response.text
        return response.json()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.web:
            self.web.stop()
        self.redis.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def make_stack(request: pytest.FixtureRequest | str, tmp_path_factory, model: Path, appendonly: bool = False,
               replicas: int = 0, **env: str) -> Stack:
    """A stack on a private redis-server, or with ``replicas``, on a master, replicas and three sentinels;
    its logs are named after the test (or the name given instead of the request)."""
    name = request if isinstance(request, str) else request.node.name
    logs = ARTIFACTS / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    workdir = tmp_path_factory.mktemp(f"redis-{name}")
    if replicas:
        redis = SentinelCluster(workdir, replicas=replicas, appendonly=appendonly).start()
    else:
        redis = RedisServer(workdir, appendonly=appendonly).start()
    return Stack(redis=redis, model=str(model), logs=logs, env=env)


@contextlib.contextmanager
def running_stack(request: pytest.FixtureRequest | str, tmp_path_factory, model: Path, **env: str
                  ) -> Iterator[Stack]:
    """Redis, the web and one worker, started; everything stopped afterwards."""
    s = make_stack(request, tmp_path_factory, model, **env)
    try:
        s.start_web()
        s.start_worker()
        yield s
    finally:
        s.stop()


# The shared stacks: one per checkpoint, started once per test process by the first test that asks for it
# (tests/scheduling.py sends every test that shares one to the same process) and used by every test that
# neither kills nor reconfigures anything. Their settings are the union of what those tests need.
WEBHOOK_SECRET = "test-webhook-secret"
SHARED_TINY_ENV = {
    # Small KV blocks and a small step budget: the engine tests' prompts span many blocks and chunks.
    "BLOOMQ_KV_BLOCK_TOKENS": "8", "BLOOMQ_STEP_TOKENS": "24",
    # The batch tests send a message that is never delivered: it is sent again after 2 s.
    "BLOOMQ_LOST_DELIVERY_SECONDS": "2",
}
SHARED_SLOW_ENV = {
    "BLOOMQ_WEBHOOK_SECRET": WEBHOOK_SECRET, "BLOOMQ_WEBHOOK_ALLOW": "127.0.0.1/32",
    # Every watcher of the watchers test comes from one address: the per-key cap is not what it tests.
    "BLOOMQ_MAX_WATCHERS_PER_KEY": "1000",
    # A neutral host name: the browser test's dashboard screenshot goes into the docs (docs/dashboard.png).
    "BLOOMQ_WORKER_HOST": "gpu-box-1",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory, tiny_model_dir) -> Iterator[Stack]:
    """The shared stack on the tiny checkpoint: a worker and the web."""
    with running_stack("shared-tiny", tmp_path_factory, tiny_model_dir, **SHARED_TINY_ENV) as s:
        yield s


@pytest.fixture(scope="session")
def slow_stack(tmp_path_factory, slow_model_dir) -> Iterator[Stack]:
    """The shared stack on the slower checkpoint, for jobs still running when a test acts on them."""
    with running_stack("shared-slow", tmp_path_factory, slow_model_dir, **SHARED_SLOW_ENV) as s:
        yield s


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory) -> Path:
    """A bigger random BLOOM (~10 ms a token here), so a long job is still running when we act on it."""
    return built_once(tmp_path_factory, "slow-bloom", hidden_size=512, n_layer=8, n_head=8)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny checkpoint, loaded here with from_pretrained, for direct generate() calls."""
    return make_reference(tiny_model_dir)


def make_reference(model_dir: Path):
    """``generate(prompt, **kwargs) -> text``: greedy ``model.generate`` on the checkpoint, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def generate(prompt: str, **kwargs) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, **kwargs)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def check_greedy(prompt: str, output: dict, tolerance: float = 1e-4) -> None:
        """Every token of ``output`` (a job's output, run with ``details``) is the greedy choice given the
        tokens before it, up to float rounding: its logit under the reference (eager BLOOM, fp32, the whole
        text in one pass) is within ``tolerance`` (relative to the largest) of the best one. Long greedy
        texts from a batched engine and from ``generate`` may part at an exact near-tie and then differ
        everywhere; this holds either way, and fails on any real mistake. The text is the tokens' text."""
        chosen = [token["id"] for token in output["details"]["tokens"]]
        assert chosen and len(chosen) == output["generated_tokens"]
        assert tokenizer.decode(chosen, skip_special_tokens=True) == output["generated_text"]
        prompt_ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + chosen[:-1]])).logits[0, len(prompt_ids) - 1 :].float()
        best = logits.max(dim=-1).values
        gaps = best - logits.gather(1, torch.tensor(chosen).unsqueeze(1)).squeeze(1)
        allowed = tolerance * best.abs().clamp(min=1.0)
        worst = int(torch.argmax(gaps - allowed))
        assert bool((gaps <= allowed).all()), (
            f"token {worst} ({chosen[worst]}) is {float(gaps[worst]):.3g} below the best logit "
            f"{float(best[worst]):.4g}: not a greedy choice")

    generate.check_greedy = check_greedy
    return generate

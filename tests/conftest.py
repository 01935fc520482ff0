"""Shared fixtures: a private redis-server and a tiny BLOOM checkpoint built on the spot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import RedisServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` (as ``make test`` runs) with the units and order of tests/scheduling.py."""
    if config.getvalue("dist") != "loadfile":
        return None
    from tests.scheduling import CostScheduling

    return CostScheduling(config, log)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a freshly emptied database."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, **shape: int) -> Path:
    """A random BLOOM checkpoint (``worker.model.tiny``) built once for the whole run: the test processes of
    ``pytest -n`` share the parent of their temporary directories, and the first to get here builds it."""
    from filelock import FileLock

    from worker.model.tiny import build_tiny_bloom

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "checkpoints" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not (out / ".built").exists():
            build_tiny_bloom(out, **shape)
            (out / ".built").touch()
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLOOM with a trained tokenizer, saved with save_pretrained."""
    return built_once(tmp_path_factory, "tiny-bloom")

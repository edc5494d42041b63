"""Shared fixtures: a real redis-server per test session (no fakeredis), tiny random models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from launcher.redis_server import RedisProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port for the whole session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, flushed before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """An artifact volume with random tiny models: tiny-llama, tiny-qwen2, tiny-gpt2 (fp32)."""
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("artifacts")
    make_tiny_model(root, "tiny-llama", "llama")
    make_tiny_model(root, "tiny-qwen2", "qwen2", seed=1)
    make_tiny_model(root, "tiny-gpt2", "gpt2", seed=2)
    return root

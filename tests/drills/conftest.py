"""Drills: the whole system as processes (``spindle up``), with real faults injected."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import System, start_system, stop_system

DRILL_MODEL = "tiny-llama"


def system_env(artifacts: Path, **extra: str) -> dict[str, str]:
    env = {"ARTIFACTS_DIR": str(artifacts), "DEFAULT_MODEL": DRILL_MODEL, "DTYPE": "float32",
           "SERVICES": "gateway,worker", "WORKER_COUNT": "2", "CLAIM_IDLE_MS": "1500",
           "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3", "MAX_BATCH": "32"}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def drill_artifacts(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("drill-artifacts")
    make_tiny_model(root, DRILL_MODEL, "llama")
    return root


@pytest.fixture(scope="session")
def two_worker_system(tmp_path_factory, drill_artifacts) -> Iterator[System]:
    s = start_system(tmp_path_factory.mktemp("drill"), system_env(drill_artifacts))
    wait_workers(s, 2)
    yield s
    stop_system(s)


class PeakRss:
    """The peak RSS of the whole system (``spindle up`` and every process under it: Redis, gateway,
    workers), sampled every 0.2 s on a thread while the ``with`` block runs."""

    def __init__(self, system: System) -> None:
        self.root = psutil.Process(system.proc.pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _total(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def mib(self) -> int:
        return self.peak >> 20


def worker_processes(system: System) -> list[psutil.Process]:
    """The live worker processes (a killed one may linger as a zombie until the launcher reaps it)."""
    out = []
    for p in psutil.Process(system.proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.cmdline()[-2:] == ["-m", "worker"]:
                out.append(p)
        except psutil.Error:
            continue
    return out


def wait_workers(system: System, n: int, timeout: float = 120) -> None:
    import time

    import redis

    from protocol import keys

    r = redis.Redis.from_url(system.redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(r.scan_iter(keys.WORKER_KEY_PATTERN))) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {n} live workers after {timeout}s")


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int,
                            on_first=None) -> tuple[str, str | None]:
    """One streaming /v1/completions request; returns (text, finish_reason)."""
    import json

    text, finish = [], None
    async with client.stream("POST", "/v1/completions", json={
            "model": DRILL_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for c in chunk["choices"]:
                text.append(c["text"])
                finish = c.get("finish_reason") or finish
            if on_first is not None and len(text) == 1:
                on_first()
    return "".join(text), finish


async def run_concurrently(coros) -> list:
    return await asyncio.gather(*coros, return_exceptions=True)

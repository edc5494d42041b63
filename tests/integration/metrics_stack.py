"""For the observability tests: a real worker (paged engine on tiny-llama, metrics on a loopback port)
in the test's event loop, the real gateway app on uvicorn in a thread, and Prometheus text parsing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from launcher.redis_server import free_port
from protocol.settings import WorkerSettings
from tests.integration.gateway_harness import MODEL, RunningGateway, gateway_settings, start_gateway
from worker.engine.loader import load_engine
from worker.service import Worker


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


def has(text: str, name: str) -> bool:
    return any(n == name for n, _, _ in samples(text))


async def eventually(check: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    gateway: RunningGateway
    worker: Worker
    worker_metrics_url: str
    http: httpx.AsyncClient

    async def gateway_metrics(self) -> str:
        return (await self.http.get(self.gateway.url + "/metrics")).text

    async def worker_metrics(self) -> str:
        return (await self.http.get(self.worker_metrics_url)).text


@asynccontextmanager
async def observed_stack(redis_url: str, artifacts: Path, tmp: Path) -> AsyncIterator[Stack]:
    engine = await asyncio.to_thread(load_engine, "paged", artifacts / MODEL, "cpu", "float32",
                                     WorkerSettings(max_batch=8, kv_cache_memory="16MiB"))
    port = free_port()
    worker = Worker(WorkerSettings(redis_url=redis_url, worker_id=f"wk-test-{uuid.uuid4().hex[:6]}", max_batch=8,
                                   heartbeat_interval=0.2, worker_metrics_port=port))
    worker.add_model(MODEL, engine, "cpu", "float32")
    await worker.start()
    gateway = await asyncio.to_thread(
        start_gateway, gateway_settings(redis_url, artifacts, tmp, queue_metrics_interval=0.1))
    http = httpx.AsyncClient(timeout=60)
    try:
        stack = Stack(gateway, worker, f"http://127.0.0.1:{port}/metrics", http)
        await eventually(lambda: _ready(stack), what="gateway ready")
        yield stack
    finally:
        await http.aclose()
        await asyncio.to_thread(gateway.stop)
        await worker.stop()


async def _ready(stack: Stack) -> bool:
    return (await stack.http.get(stack.gateway.url + "/ready")).status_code == 200

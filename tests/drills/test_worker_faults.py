"""Drills 1 and 4 of docs/reliability.md: a worker killed (-9) or stopped (SIGTERM) under load.

32 concurrent greedy streaming requests; one of the two workers is killed mid-stream. Every request
must finish, and each output must equal the same request's output on an undisturbed system.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.drills.conftest import PeakRss, run_concurrently, stream_completion, wait_workers, worker_processes

pytestmark = pytest.mark.drill
N = 32
MAX_TOKENS = 48
PROMPTS = [f"To be or not {i} " * (1 + i % 3) for i in range(N)]


async def _run_all(base: str, fault=None) -> list:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        started = asyncio.Event()
        tasks = [stream_completion(client, p, MAX_TOKENS, on_first=started.set) for p in PROMPTS]
        gathered = asyncio.ensure_future(run_concurrently(tasks))
        if fault is not None:
            await started.wait()
            await asyncio.sleep(0.3)  # well inside the generation
            fault()
        return await gathered


@pytest.fixture(scope="module")
def undisturbed(two_worker_system) -> list:
    results = asyncio.run(_run_all(two_worker_system.gateway))
    assert all(not isinstance(r, BaseException) for r in results), results
    return results


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_worker_dies_under_load_and_nothing_is_lost(two_worker_system, undisturbed, sig):
    wait_workers(two_worker_system, 2)
    victim = worker_processes(two_worker_system)[0]
    with PeakRss(two_worker_system) as rss:
        results = asyncio.run(_run_all(two_worker_system.gateway, lambda: os.kill(victim.pid, sig)))
    failed = [r for r in results if isinstance(r, BaseException)]
    differ = sum(1 for got, want in zip(results, undisturbed, strict=True) if got != want)
    print(f"\ndrill {'1 (kill -9)' if sig == signal.SIGKILL else '4 (SIGTERM)'}: {N} streaming requests x "
          f"{MAX_TOKENS} tokens, {N - len(failed)} completed, {len(failed)} failed, {differ} differ from an "
          f"undisturbed run (a lost or duplicated token would show here); peak RSS of the system {rss.mib} MiB")
    assert not failed, f"{len(failed)} of {N} requests failed: {failed[:3]}"
    mismatched = [i for i, (got, want) in enumerate(zip(results, undisturbed, strict=True)) if got != want]
    detail = [(results[i], undisturbed[i]) for i in mismatched[:2]]
    assert not mismatched, f"outputs differ from the undisturbed run for requests {mismatched}: {detail}"
    assert all(finish == "length" for _text, finish in results)

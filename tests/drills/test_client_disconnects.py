"""Drill 5 of docs/reliability.md: half of the streaming clients hang up mid-stream.

Their jobs must be cancelled (the worker's event log for each ends in "cancelled", well short of
max_tokens), and the other half must finish with the same output as on an undisturbed system.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis

from protocol import keys
from protocol.messages import TokenEvent, WorkerInfo
from tests.drills.conftest import DRILL_MODEL, PeakRss, stream_completion, wait_workers

pytestmark = pytest.mark.drill
N = 16
MAX_TOKENS = 400


async def _hang_up_after(client: httpx.AsyncClient, prompt: str, chunks: int) -> str:
    """Read ``chunks`` chunks of a stream, then close the connection; returns the completion id."""
    async with client.stream("POST", "/v1/completions", json={
            "model": DRILL_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}) as resp:
        seen = 0
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk_id = json.loads(line[6:])["id"]
                seen += 1
                if seen >= chunks:
                    return chunk_id
    raise AssertionError("stream ended before the client hung up")


def test_half_the_clients_disconnect(two_worker_system):
    wait_workers(two_worker_system, 2)
    prompts = [f"Once more unto the breach {i}" for i in range(N)]

    async def run():
        async with httpx.AsyncClient(base_url=two_worker_system.gateway, timeout=120) as client:
            reference = await asyncio.gather(*(stream_completion(client, p, 40) for p in prompts[1::2]))
            results = await asyncio.gather(
                *(_hang_up_after(client, p, 3) if i % 2 == 0 else stream_completion(client, p, 40)
                  for i, p in enumerate(prompts)))
            return reference, results

    with PeakRss(two_worker_system) as rss:
        reference, results = asyncio.run(run())
    assert results[1::2] == reference  # the clients that stayed got exactly their text
    r = redis.Redis.from_url(two_worker_system.redis_url)
    hung_up = results[0::2]
    # The gateway's completion id is the request id of the job (minus its prefix).
    logs: dict[str, list[TokenEvent]] = {}
    for _ in range(100):
        logs = {}
        for key in r.scan_iter(keys.progress_key("*")):
            events = [TokenEvent.model_validate_json(e) for e in r.lrange(key, 0, -1)]
            logs[events[0].request_id] = events
        cancelled = [evs for rid, evs in logs.items() if any(h.endswith(rid) or rid.endswith(h) for h in hung_up)
                     and evs[-1].finish_reason == "cancelled"]
        if len(cancelled) == len(hung_up):
            break
        asyncio.run(asyncio.sleep(0.1))
    assert len(cancelled) == len(hung_up), f"{len(cancelled)} of {len(hung_up)} hung-up jobs were cancelled"
    assert all(evs[-1].completion_tokens < MAX_TOKENS for evs in cancelled)
    # Every slot is free again (heartbeats report the engines' running counts every 0.5 s).
    for _ in range(50):
        infos = [WorkerInfo.model_validate_json(v) for k in r.scan_iter(keys.WORKER_KEY_PATTERN)
                 if (v := r.get(k))]
        if sum(i.running + i.waiting for i in infos) == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    print(f"\ndrill 5 (disconnects): {N} streams, {len(hung_up)} hung up after 3 chunks, {len(cancelled)} of their "
          f"jobs cancelled (at most {max(evs[-1].completion_tokens for evs in cancelled)} of {MAX_TOKENS} tokens "
          f"computed), {sum(a == b for a, b in zip(results[1::2], reference, strict=True))} of {len(reference)} "
          f"others exact, slots busy afterwards: {sum(i.running + i.waiting for i in infos)}; peak RSS of the "
          f"system {rss.mib} MiB")
    assert sum(i.running + i.waiting for i in infos) == 0, infos

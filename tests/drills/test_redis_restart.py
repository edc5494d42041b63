"""Drill 2 of docs/reliability.md: Redis restarted under load, the whole system as ``spindle up`` runs it.

Redis is the embedded one the launcher supervises. It is killed (SIGKILL) while 16 streaming requests
are mid-generation; the launcher starts it again on the same port with the same data directory, which
holds nothing: the embedded Redis runs without persistence (``--save "" --appendonly no``), so it
comes back EMPTY (queued jobs, consumer groups, event logs, heartbeats and loaded Lua scripts are gone).
That is the harder case for the services: the gateway has to re-subscribe and reload its admission
script, the worker has to create its consumer group again, notice that its running jobs are gone
(the fence refuses their writes) and heartbeat again.

What must hold:
- no client hangs: each in-flight stream ends, completed or with a ``redis_unavailable`` error event,
  within seconds of the kill; a request sent during the outage gets a 503 with ``Retry-After``;
- ``/ready`` answers 503 during the outage;
- after Redis is back, a new request succeeds within 5 s (the recovery time is printed), a new burst
  of 16 streams all complete, and the worker runs no ghost of the jobs lost with Redis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest
import redis

from protocol import keys
from protocol.messages import WorkerInfo
from tests.drills.conftest import DRILL_MODEL, system_env, wait_workers
from tests.e2e.conftest import System, start_system, stop_system

pytestmark = pytest.mark.drill
N = 16
MAX_TOKENS = 200
PROMPTS = [f"Now is the winter {i} " * (1 + i % 3) for i in range(N)]
FAIL_FAST_S = 5.0  # an in-flight stream must end this soon after the kill
HUNG_S = 60.0  # a stream not ended this long after the kill counts as hung
RECOVERY_S = 5.0  # a new request must succeed this soon after Redis answers again


@dataclass
class Outcome:
    kind: str  # "completed", "error" (with code), "http <status>"
    code: str | None = None
    ended: float = 0.0  # time.monotonic() when the stream ended


async def stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event,
                 max_tokens: int = MAX_TOKENS) -> Outcome:
    async with client.stream("POST", "/v1/completions", json={
            "model": DRILL_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Outcome(f"http {resp.status_code}", ended=time.monotonic())
        finish = None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Outcome("error", chunk["error"].get("code"), time.monotonic())
            started.set()
            for c in chunk["choices"]:
                finish = c.get("finish_reason") or finish
    return Outcome("completed" if finish == "length" else f"ended ({finish})", ended=time.monotonic())


def redis_server_process(system: System) -> psutil.Process:
    for p in psutil.Process(system.proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.name() == "redis-server":
                return p
        except psutil.Error:
            continue
    raise AssertionError("the launcher runs no redis-server")


@pytest.fixture(scope="module")
def one_worker_system(tmp_path_factory, drill_artifacts) -> Iterator[System]:
    s = start_system(tmp_path_factory.mktemp("drill-redis"), system_env(drill_artifacts, WORKER_COUNT="1"))
    wait_workers(s, 1)
    yield s
    stop_system(s)


async def _outage(system: System, client: httpx.AsyncClient, killed_at: float) -> dict:
    """From the kill until Redis answers again: /ready's answers, one request's; when Redis came back."""
    r = redis.Redis.from_url(system.redis_url, socket_timeout=1, socket_connect_timeout=1)
    sent = time.monotonic()
    during = await client.post("/v1/completions", json={"model": DRILL_MODEL, "prompt": "x", "max_tokens": 4})
    request = (during.status_code, during.headers.get("retry-after"), time.monotonic() - sent)
    ready_codes = []
    while True:
        ready_codes.append((await client.get("/ready")).status_code)
        try:
            if await asyncio.to_thread(r.ping):
                return {"up_at": time.monotonic(), "ready": ready_codes, "request": request}
        except redis.RedisError:
            pass
        assert time.monotonic() - killed_at < 60, "the launcher did not start Redis again within 60s"
        await asyncio.sleep(0.05)


async def _first_success(client: httpx.AsyncClient, up_at: float) -> tuple[float, dict[str, int]]:
    """Seconds from Redis answering to the first request that succeeds; the failed tries by error code."""
    failures: dict[str, int] = {}
    while time.monotonic() - up_at < 60:
        try:
            resp = await client.post("/v1/completions", timeout=10, json={
                "model": DRILL_MODEL, "prompt": "back?", "max_tokens": 4})
            if resp.status_code == 200:
                return time.monotonic() - up_at, failures
            why = f"{resp.status_code} {resp.json().get('error', {}).get('code')}"
        except (httpx.HTTPError, ValueError) as e:
            why = type(e).__name__
        failures[why] = failures.get(why, 0) + 1
        await asyncio.sleep(0.05)
    raise AssertionError("no request succeeded within 60s of Redis coming back")


async def _drill(system: System) -> dict:
    async with httpx.AsyncClient(base_url=system.gateway, timeout=httpx.Timeout(HUNG_S, connect=5)) as client:
        started = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(stream(client, p, ev)) for p, ev in zip(PROMPTS, started, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 60)
        victim = redis_server_process(system)
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)
        outage = await _outage(system, client, killed_at)
        recovery, failures = await _first_success(client, outage["up_at"])
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, HUNG_S - (time.monotonic() - killed_at)))
        for t in pending:
            t.cancel()
        in_flight = [t.result() for t in tasks if t in done]

        after_started = [asyncio.Event() for _ in PROMPTS]
        after = await asyncio.wait_for(asyncio.gather(
            *(stream(client, p, ev, 32) for p, ev in zip(PROMPTS, after_started, strict=True))), 120)
        return {"killed_at": killed_at, "in_flight": in_flight, "hung": len(pending), "outage": outage,
                "recovery": recovery, "failures": failures, "after": after}


def _worker_idle(system: System, timeout: float = 15) -> WorkerInfo:
    """The worker's heartbeat once it reports nothing running (bounded wait)."""
    r = redis.Redis.from_url(system.redis_url)
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        raw = [r.get(k) for k in r.scan_iter(keys.WORKER_KEY_PATTERN)]
        infos = [WorkerInfo.model_validate_json(x) for x in raw if x]
        if infos:
            info = infos[0]
            if info.running == 0 and info.waiting == 0:
                return info
        time.sleep(0.2)
    raise AssertionError(f"the worker still runs jobs {timeout:.0f}s after the load ended: {info}")


def test_redis_restart_under_load(one_worker_system):
    res = asyncio.run(_drill(one_worker_system))
    killed_at, outage = res["killed_at"], res["outage"]
    in_flight: list[Outcome] = res["in_flight"]
    completed = [o for o in in_flight if o.kind == "completed"]
    errors = [o for o in in_flight if o.kind == "error"]
    fast = [o for o in errors if o.ended - killed_at <= FAIL_FAST_S]
    slowest = max((o.ended - killed_at for o in errors), default=0.0)
    status, retry_after, latency = outage["request"]
    print(f"\nredis restart under load: {N} requests in flight, {len(completed)} completed, {len(fast)} failed fast "
          f"(slowest error {slowest:.2f}s after the kill), {len(errors) - len(fast)} failed slowly, "
          f"{res['hung']} hung; Redis down {outage['up_at'] - killed_at:.2f}s; a request during the outage: "
          f"{status} in {latency * 1000:.0f} ms; /ready during the outage: {sorted(set(outage['ready']))}; "
          f"recovery (first success after Redis answered): {res['recovery']:.2f}s "
          f"(failed tries before: {res['failures']}); "
          f"after: {sum(o.kind == 'completed' for o in res['after'])}/{N} streams completed")

    assert res["hung"] == 0, f"{res['hung']} streams hung"
    odd = [o for o in in_flight if o.kind not in ("completed", "error")]
    assert not odd, f"streams ended neither completed nor with an error event: {odd}"
    assert all(o.code == "redis_unavailable" for o in errors), [o.code for o in errors]
    assert len(fast) == len(errors), f"{len(errors) - len(fast)} errors came later than {FAIL_FAST_S}s after the kill"
    assert status == 503 and retry_after, f"a request during the outage got {status} (Retry-After {retry_after})"
    assert 503 in outage["ready"], f"/ready never said 503 during the outage: {outage['ready']}"
    assert res["recovery"] <= RECOVERY_S, f"first success {res['recovery']:.2f}s after Redis came back"
    assert all(o.kind == "completed" for o in res["after"]), res["after"]
    assert httpx.get(one_worker_system.gateway + "/ready", timeout=5).status_code == 200
    _worker_idle(one_worker_system)  # the jobs lost with Redis are not still being generated

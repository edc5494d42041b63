"""SIGTERM to a gateway (a real ``python -m gateway`` process before a real worker): ``/ready`` turns 503
at once, new requests get 503 with ``Retry-After``, the stream in flight completes, then the process
exits with 0. A stream longer than ``GATEWAY_DRAIN_TIMEOUT`` ends at the timeout with a ``shutting_down``
error event and ``[DONE]``, and its job is cancelled.

The worker runs the echo engine with a fixed step delay, so a stream's length in time is known.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest
import redis

from protocol import keys
from tests.drills.conftest import DRILL_MODEL
from tests.drills.services import Service, service_env, start_gateway, start_worker

pytestmark = pytest.mark.drill
STEP_S = 0.03  # echo engine: one token per 30 ms


@pytest.fixture(scope="module")
def drain_env(redis_server, drill_artifacts, tmp_path_factory) -> tuple[dict[str, str], Path]:
    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("drain")
    return service_env(redis_server.url, drill_artifacts, tmp, ENGINE="echo", ECHO_STEP_DELAY=str(STEP_S),
                       MAX_BATCH="8"), tmp


@pytest.fixture(scope="module")
def echo_worker(drain_env):
    env, tmp = drain_env
    w = start_worker(env, tmp / "worker.log")
    yield w
    w.stop()


async def read_stream(client: httpx.AsyncClient, max_tokens: int, first: asyncio.Event) -> dict:
    """One streaming completion: its id, token count, finish reason, whether [DONE] came, how it ended."""
    out: dict = {"id": None, "tokens": 0, "finish": None, "done": False, "cut": None}
    try:
        async with client.stream("POST", "/v1/completions", json={
                "model": DRILL_MODEL, "prompt": "To be or not to be", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["cut"] = chunk["error"]["code"]
                        continue
                    out["id"] = chunk["id"]
                    out["tokens"] += 1
                    out["finish"] = chunk["choices"][0]["finish_reason"] or out["finish"]
                    first.set()
    except httpx.HTTPError as e:  # the connection closed under the stream
        out["cut"] = type(e).__name__
    return out


async def wait_not_ready(url: str, stream: asyncio.Task) -> httpx.Response:
    """Poll ``/ready`` on new connections until it says 503; the stream must still be open then."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
        for _ in range(100):
            r = await probe.get("/ready")
            if r.status_code == 503:
                assert not stream.done(), "the stream ended before /ready turned 503"
                return r
            await asyncio.sleep(0.02)
    raise AssertionError("/ready never turned 503 after SIGTERM")


def test_sigterm_lets_the_open_stream_finish(drain_env, echo_worker):
    env, tmp = drain_env
    gw = start_gateway({**env, "GATEWAY_DRAIN_TIMEOUT": "30"}, tmp / "gateway-1.log")
    max_tokens = 80  # about 2.4 s at STEP_S

    async def scenario() -> tuple[dict, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            first = asyncio.Event()
            stream = asyncio.create_task(read_stream(client, max_tokens, first))
            await asyncio.wait_for(first.wait(), 30)
            gw.proc.send_signal(signal.SIGTERM)
            ready = await wait_not_ready(gw.url, stream)
            async with httpx.AsyncClient(base_url=gw.url, timeout=5) as newcomer:
                refused = await newcomer.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            return await stream, ready, refused

    try:
        result, ready, refused = asyncio.run(scenario())
        code = gw.proc.wait(30)
    finally:
        gw.stop()
    assert ready.json()["checks"]["draining"] is True and "retry-after" in ready.headers
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert result == {"id": result["id"], "tokens": max_tokens, "finish": "length", "done": True, "cut": None}
    assert code == 0, gw.log_text()[-3000:]
    assert "drained" in gw.log_text()


def test_drain_is_bounded_by_gateway_drain_timeout(drain_env, echo_worker):
    env, tmp = drain_env
    gw: Service = start_gateway({**env, "GATEWAY_DRAIN_TIMEOUT": "1"}, tmp / "gateway-2.log")
    max_tokens = 400  # 12 s at STEP_S: far past the drain timeout

    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            first = asyncio.Event()
            stream = asyncio.create_task(read_stream(client, max_tokens, first))
            await asyncio.wait_for(first.wait(), 30)
            gw.proc.send_signal(signal.SIGTERM)
            return await stream

    try:
        result = asyncio.run(scenario())
        code = gw.proc.wait(30)
    finally:
        gw.stop()
    # told why, in the stream, and the stream closed properly
    assert result["cut"] == "shutting_down" and result["done"] and result["finish"] is None, result
    assert result["tokens"] < max_tokens
    assert code == 0, gw.log_text()[-3000:]
    assert "drain timeout" in gw.log_text()
    # the cut stream's job was cancelled, so the worker stops spending steps on it
    assert redis.Redis.from_url(env["REDIS_URL"]).exists(keys.cancelled_key(result["id"]))

"""Drill 3 of docs/reliability.md: ten times more requests than the system can serve, for a few seconds.

A real gateway and a real worker as processes (``tests/drills/services.py``); the worker runs the echo
engine with a fixed step delay, so its capacity is known: ``MAX_BATCH`` requests of ``MAX_TOKENS``
tokens at ``STEP_S`` per token. Requests arrive open-loop (they do not wait for each other) at ten
times that rate, streaming and not, with prompts of several sizes. What must hold:

- every answer is a 2xx or a 429 (no 5xx, no error inside an admitted stream), every 429 has
  ``Retry-After``, and each admitted request completes;
- the queue never holds more than ``QUEUE_CAPACITY`` waiting jobs (the stream's length never more than
  that plus the jobs the worker holds);
- the gateway's and the worker's memory (RSS, sampled during the run) stay within a generous bound of
  where they started;
- afterwards the queue empties and a new request succeeds.

The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from protocol import keys
from tests.drills.conftest import DRILL_MODEL
from tests.drills.services import service_env, start_gateway, start_worker

pytestmark = pytest.mark.drill
STEP_S = 0.02
MAX_BATCH = 4
MAX_TOKENS = 16
QUEUE_CAPACITY = 8
OVERLOAD = 10
DURATION_S = 3.0
CAPACITY_RPS = MAX_BATCH / (MAX_TOKENS * STEP_S)  # 12.5 requests per second
RATE_RPS = OVERLOAD * CAPACITY_RPS
PROMPTS = ["To be", "Now is the winter of our discontent " * 3, "All the world's a stage, " * 12]
RSS_SLACK = 1.5  # peak RSS must stay under start * RSS_SLACK + RSS_EXTRA
RSS_EXTRA = 64 * 2**20


@dataclass
class Answer:
    status: int
    retry_after: str | None = None
    complete: bool = False  # 2xx: the whole completion arrived (finish_reason length, [DONE] for streams)
    error: str | None = None  # an error inside a 200 stream
    latency: float = 0.0


@dataclass
class Peaks:
    waiting: int = 0
    length: int = 0
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (start, peak)


async def one_request(client: httpx.AsyncClient, i: int) -> Answer:
    stream = i % 2 == 0
    body = {"model": DRILL_MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": stream}
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        answer = Answer(resp.status_code, resp.headers.get("retry-after"))
        if resp.status_code != 200:
            await resp.aread()
        elif not stream:
            out = json.loads(await resp.aread())
            answer.complete = out["choices"][0]["finish_reason"] == "length"
        else:
            finish, done = None, False
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        answer.error = chunk["error"]["code"]
                    else:
                        finish = chunk["choices"][0]["finish_reason"] or finish
            answer.complete = done and finish == "length" and answer.error is None
    answer.latency = time.monotonic() - start
    return answer


async def overload(url: str) -> tuple[list[Answer], float]:
    """Requests at ``RATE_RPS`` for ``DURATION_S``, each started on time whatever the others do."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: list[asyncio.Task] = []
        while loop.time() - start < DURATION_S:
            due = int((loop.time() - start) * RATE_RPS) + 1
            while len(tasks) < due:
                tasks.append(asyncio.create_task(one_request(client, len(tasks))))
            await asyncio.sleep(0.005)
        offered_for = loop.time() - start
        return list(await asyncio.gather(*tasks)), offered_for


class Sampler(threading.Thread):
    """Samples the job stream (waiting = the group's lag, length = XLEN) and each process' RSS."""

    def __init__(self, redis_url: str, processes: dict[str, int], every: float = 0.05):
        super().__init__(name="overload-sampler", daemon=True)
        self.r = redis.Redis.from_url(redis_url)
        self.stream = keys.jobs_stream(DRILL_MODEL)
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        self.every = every
        self.peaks = Peaks(rss={name: (p.memory_info().rss,) * 2 for name, p in self.processes.items()})
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        p = self.peaks
        if self.r.exists(self.stream):
            p.length = max(p.length, int(self.r.xlen(self.stream)))
            for g in self.r.xinfo_groups(self.stream):
                if g["name"] in (keys.JOBS_GROUP, keys.JOBS_GROUP.encode()):
                    lag = g.get("lag")
                    waiting = int(lag) if lag is not None else self._waiting_after(g["last-delivered-id"])
                    p.waiting = max(p.waiting, waiting)
        for name, proc in self.processes.items():
            start, peak = p.rss[name]
            p.rss[name] = (start, max(peak, proc.memory_info().rss))
        self.samples += 1

    def _waiting_after(self, last_delivered: bytes | str) -> int:  # Redis < 7 reports no lag
        last = last_delivered.decode() if isinstance(last_delivered, bytes) else last_delivered
        return len(self.r.xrange(self.stream, min="(" + last, max="+"))

    def stop(self) -> Peaks:
        self._done.set()
        self.join(5)
        self.sample()
        return self.peaks


@pytest.fixture(scope="module")
def overload_system(redis_server, drill_artifacts, tmp_path_factory):
    redis.Redis.from_url(redis_server.url).flushall()
    tmp: Path = tmp_path_factory.mktemp("overload")
    env = service_env(redis_server.url, drill_artifacts, tmp, ENGINE="echo", ECHO_STEP_DELAY=str(STEP_S),
                      MAX_BATCH=str(MAX_BATCH), QUEUE_CAPACITY=str(QUEUE_CAPACITY))
    worker = start_worker(env, tmp / "worker.log")
    try:
        gateway = start_gateway(env, tmp / "gateway.log")
    except BaseException:
        worker.stop()
        raise
    yield gateway, worker, redis_server.url, env
    gateway.stop()
    worker.stop()


def test_ten_times_overload_sheds_load_with_429s(overload_system):
    gateway, worker, redis_url, _env = overload_system
    sampler = Sampler(redis_url, {"gateway": gateway.proc.pid, "worker": worker.proc.pid})
    sampler.start()
    answers, offered_for = asyncio.run(overload(gateway.url))
    peaks = sampler.stop()

    statuses = Counter(a.status for a in answers)
    ok = [a for a in answers if 200 <= a.status < 300]
    refused = [a for a in answers if a.status == 429]
    server_errors = [a for a in answers if a.status >= 500]
    rss_mb = {name: (start / 2**20, peak / 2**20) for name, (start, peak) in peaks.rss.items()}
    print(f"\ndrill 3 (overload): {len(answers)} requests in {offered_for:.1f}s "
          f"({len(answers) / offered_for:.0f}/s offered: {len(answers) / offered_for / CAPACITY_RPS:.1f}x the "
          f"worker's {CAPACITY_RPS:.1f}/s, aiming at {OVERLOAD}x); "
          f"2xx {len(ok)}, 429 {len(refused)}, 5xx {len(server_errors)}, other {dict(statuses)}; "
          f"peak waiting jobs {peaks.waiting} (capacity {QUEUE_CAPACITY}), peak stream length {peaks.length}; "
          f"{sampler.samples} samples; "
          + ", ".join(f"{n} RSS {s:.0f} -> peak {p:.0f} MiB" for n, (s, p) in rss_mb.items())
          + (f"; 429 latency median {statistics.median(a.latency for a in refused) * 1000:.0f} ms" if refused else "")
          + (f"; 2xx latency median {statistics.median(a.latency for a in ok):.2f}s" if ok else ""))

    assert not server_errors, f"{len(server_errors)} 5xx answers: {Counter(a.status for a in server_errors)}"
    assert set(statuses) <= {200, 429}, statuses
    assert refused and ok, "the drill did not overload the system (or served nothing)"
    assert all(a.retry_after and int(a.retry_after) >= 1 for a in refused), "a 429 without Retry-After"
    incomplete = [a for a in ok if not a.complete]
    assert not incomplete, f"{len(incomplete)} admitted requests did not complete: {incomplete[:3]}"
    assert peaks.waiting <= QUEUE_CAPACITY
    assert peaks.length <= QUEUE_CAPACITY + MAX_BATCH
    for name, (start, peak) in peaks.rss.items():
        assert peak <= start * RSS_SLACK + RSS_EXTRA, f"{name} RSS grew from {start >> 20} to {peak >> 20} MiB"

    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'spindle_admission_rejections_total{{reason="queue_full"}} {float(len(refused))}' in metrics

    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while r.xlen(keys.jobs_stream(DRILL_MODEL)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xlen(keys.jobs_stream(DRILL_MODEL)) == 0, "the queue did not empty after the overload"

    async def one_more() -> Answer:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            return await one_request(client, 1)

    after = asyncio.run(one_more())
    assert after.status == 200 and after.complete


RPM = 30


def test_rate_limit_holds_across_two_gateways_under_a_burst(overload_system, tmp_path):
    """Two more gateways share ``RATE_LIMIT_RPM``: 80 concurrent requests through both admit RPM of them
    (plus what refilled during the burst), refuse the rest with 429 and the headers, and the bucket
    refills: after ``Retry-After`` a request passes again."""
    _gateway, _worker, _redis_url, system_env = overload_system
    env = {**system_env, "RATE_LIMIT_RPM": str(RPM), "QUEUE_CAPACITY": "256"}
    gateways = [start_gateway(env, tmp_path / f"gateway-{i}.log") for i in range(2)]
    try:
        async def burst() -> tuple[list[httpx.Response], float]:
            clients = [httpx.AsyncClient(base_url=g.url, timeout=60) for g in gateways]
            body = {"model": DRILL_MODEL, "prompt": "To be", "max_tokens": 4, "ignore_eos": True}
            start = time.monotonic()
            try:
                out = await asyncio.gather(*(clients[i % 2].post("/v1/completions", json=body) for i in range(80)))
            finally:
                for c in clients:
                    await c.aclose()
            return list(out), time.monotonic() - start

        answers, elapsed = asyncio.run(burst())
        ok = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        refilled = int(elapsed * RPM / 60) + 1
        print(f"\nrate limit burst: 80 requests through 2 gateways in {elapsed:.2f}s, RPM {RPM}: "
              f"{len(ok)} admitted, {len(refused)} refused; Retry-After "
              f"{sorted({a.headers.get('retry-after') for a in refused})}")
        assert len(ok) + len(refused) == len(answers), Counter(a.status_code for a in answers)
        assert RPM <= len(ok) <= RPM + refilled
        for a in refused:
            assert a.json()["error"]["code"] == "rate_limit_exceeded" and int(a.headers["retry-after"]) >= 1
            assert a.headers["x-ratelimit-limit-requests"] == str(RPM)
            assert a.headers["x-ratelimit-remaining-requests"] == "0"
        assert all(a.headers["x-ratelimit-limit-requests"] == str(RPM) for a in ok)
        time.sleep(int(refused[-1].headers["retry-after"]))
        again = httpx.post(gateways[0].url + "/v1/completions", timeout=30,
                           json={"model": DRILL_MODEL, "prompt": "To be", "max_tokens": 4})
        assert again.status_code == 200, again.text
        counted = sum(float(httpx.get(g.url + "/metrics").text
                            .split('spindle_admission_rejections_total{reason="rate_limit_requests"} ')[1].split()[0])
                      for g in gateways)
        assert counted == len(refused)
    finally:
        for g in gateways:
            g.stop()

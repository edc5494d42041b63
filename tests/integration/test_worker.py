"""The worker against a real Redis and a real engine; the test plays the gateway's half of the protocol."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from protocol import keys
from protocol.messages import CancelMessage, EventBatch, Job, SamplingParams, TokenEvent, WorkerInfo
from protocol.settings import WorkerSettings
from worker.engine.loader import load_engine
from worker.service import Worker

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def engine_factory(tiny_artifacts):
    def make(kind: str = "simple"):
        return load_engine(kind, tiny_artifacts / MODEL, "cpu", "float32",
                           WorkerSettings(max_batch=8, kv_cache_memory="16MiB"))
    return make


async def start_worker(redis_url: str, engine, **kw) -> Worker:
    settings = WorkerSettings(redis_url=redis_url, worker_id=f"w-{uuid.uuid4().hex[:6]}", max_batch=8,
                              heartbeat_interval=0.2, **kw)
    w = Worker(settings)
    w.add_model(MODEL, engine, "cpu", "float32")
    await w.start()
    return w


async def collect(pubsub, request_ids: set[str], timeout: float = 60) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {rid: [] for rid in request_ids}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while done != request_ids:
        assert time.monotonic() < deadline, f"timed out; finished {done} of {request_ids}"
        try:
            msg = await asyncio.wait_for(pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0), 5)
        except TimeoutError:
            msg = None
        if not msg:
            continue
        for ev in EventBatch.decode(msg["data"]).events:
            events[ev.request_id].append(ev)
            if ev.finish_reason:
                done.add(ev.request_id)
    return events


def job(prompt: list[int], gateway: str = "gw-test", **params) -> Job:
    return Job(request_id=uuid.uuid4().hex, gateway_id=gateway, model=MODEL, prompt_token_ids=prompt,
               params=SamplingParams(**params))


@pytest.mark.parametrize("kind", ["simple", "paged"])
async def test_jobs_flow_through_worker_in_order_and_leave_the_stream(redis_url, engine_factory, kind):
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    w = await start_worker(redis_url, engine_factory(kind))
    try:
        jobs = [job([5, 6, 7, 8 + i], max_tokens=6 + i, temperature=0, ignore_eos=True) for i in range(5)]
        for j in jobs:
            await r.xadd(keys.jobs_stream(MODEL), j.to_fields())
        events = await collect(pubsub, {j.request_id for j in jobs})
        for j in jobs:
            evs = events[j.request_id]
            assert [e.seq for e in evs] == list(range(len(evs)))
            assert sum(len(e.token_ids) for e in evs) == j.params.max_tokens
            assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == j.params.max_tokens
            assert evs[0].prompt_tokens == 4 and evs[0].queue_time is not None
        await asyncio.sleep(0.1)
        assert await r.xlen(keys.jobs_stream(MODEL)) == 0  # acked and deleted
        pending = await r.xpending(keys.jobs_stream(MODEL), keys.JOBS_GROUP)
        assert pending["pending"] == 0
        info = WorkerInfo.model_validate_json(await r.get(keys.worker_key(w.id)))
        assert info.models == [MODEL] and not info.draining
    finally:
        await w.stop()
        await r.aclose()


async def test_cancel_broadcast_stops_generation(redis_url, engine_factory):
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    w = await start_worker(redis_url, engine_factory("paged"))
    try:
        j = job([1, 2, 3], max_tokens=400, temperature=0, ignore_eos=True)
        await r.xadd(keys.jobs_stream(MODEL), j.to_fields())
        msg = None
        while msg is None:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        await r.publish(keys.CANCEL_CHANNEL, CancelMessage(request_ids=[j.request_id]).model_dump_json())
        events = await collect(pubsub, {j.request_id})
        last = events[j.request_id][-1]
        assert last.finish_reason == "cancelled" and last.completion_tokens < 400
        for _ in range(50):  # the job is forgotten right after its last event is published
            if not w.servers[MODEL].jobs:
                break
            await asyncio.sleep(0.02)
        assert not w.servers[MODEL].jobs
    finally:
        await w.stop()
        await r.aclose()


async def test_expired_and_precancelled_jobs_are_dropped_before_compute(redis_url, engine_factory):
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    w = await start_worker(redis_url, engine_factory("simple"))
    try:
        expired = job([1, 2], max_tokens=5)
        expired.deadline = time.time() - 1
        cancelled = job([1, 2], max_tokens=5)
        await r.set(keys.cancelled_key(cancelled.request_id), 1, ex=60)
        for j in (expired, cancelled):
            await r.xadd(keys.jobs_stream(MODEL), j.to_fields())
        events = await collect(pubsub, {expired.request_id, cancelled.request_id})
        assert [e.finish_reason for e in events[expired.request_id]] == ["timeout"]
        assert events[expired.request_id][0].error
        assert [e.finish_reason for e in events[cancelled.request_id]] == ["cancelled"]
        assert all(e.completion_tokens == 0 for evs in events.values() for e in evs)
    finally:
        await w.stop()
        await r.aclose()


async def test_malformed_job_goes_to_dead_letter(redis_url, engine_factory):
    r = aioredis.Redis.from_url(redis_url)
    w = await start_worker(redis_url, engine_factory("simple"))
    try:
        await r.xadd(keys.jobs_stream(MODEL), {"job": "{not json"})
        for _ in range(100):
            if await r.xlen(keys.DEADLETTER_STREAM):
                break
            await asyncio.sleep(0.05)
        assert await r.xlen(keys.DEADLETTER_STREAM) == 1
        assert await r.xlen(keys.jobs_stream(MODEL)) == 0
    finally:
        await w.stop()
        await r.aclose()


async def test_dead_workers_job_is_taken_over_without_loss_or_duplicates(redis_url, engine_factory):
    """Worker A dies mid-generation (no ack, no hand-back); B claims the job and continues it."""
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    prompt = [9, 8, 7, 6]
    # The reference: the same greedy request on an undisturbed worker.
    ref_worker = await start_worker(redis_url, engine_factory("paged"))
    ref = job(prompt, max_tokens=120, temperature=0, ignore_eos=True)
    await r.xadd(keys.jobs_stream(MODEL), ref.to_fields())
    expected = [t for e in (await collect(pubsub, {ref.request_id}))[ref.request_id] for t in e.token_ids]
    await ref_worker.stop()

    a = await start_worker(redis_url, engine_factory("paged"), claim_idle_ms=600_000)
    j = job(prompt, max_tokens=120, temperature=0, ignore_eos=True)
    await r.xadd(keys.jobs_stream(MODEL), j.to_fields())
    seen: list[TokenEvent] = []
    while len(seen) < 5:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        if msg:
            seen.extend(EventBatch.decode(msg["data"]).events)
    await a.stop()  # dies: its pending entry stays un-acked, its heartbeat stops
    b = await start_worker(redis_url, engine_factory("paged"), claim_idle_ms=300)
    try:
        rest = await collect(pubsub, {j.request_id})
        by_seq: dict[int, TokenEvent] = {}
        for ev in seen + rest[j.request_id]:
            by_seq.setdefault(ev.seq, ev)  # the gateway's rule: first event per seq wins
        assert sorted(by_seq) == list(range(len(by_seq))), "gap in sequence numbers"
        tokens = [t for s in sorted(by_seq) for t in by_seq[s].token_ids]
        assert tokens == expected
        assert by_seq[max(by_seq)].finish_reason == "length"
        assert b.takeovers == 1
        assert await r.xlen(keys.jobs_stream(MODEL)) == 0
    finally:
        await b.stop()
        await r.aclose()


async def test_job_that_keeps_failing_goes_to_dead_letter_with_an_error(redis_url, engine_factory):
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    stream = keys.jobs_stream(MODEL)
    await r.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
    j = job([1, 2, 3], max_tokens=5)
    await r.xadd(stream, j.to_fields())
    await r.xreadgroup(keys.JOBS_GROUP, "ghost-worker", {stream: ">"}, count=1)  # delivery 1, then "dies"
    w = await start_worker(redis_url, engine_factory("simple"), claim_idle_ms=200, max_deliveries=1)
    try:
        events = await collect(pubsub, {j.request_id})
        last = events[j.request_id][-1]
        assert last.finish_reason == "error" and "dead-letter" in last.error
        dead = await r.xrange(keys.DEADLETTER_STREAM)
        assert len(dead) == 1 and Job.model_validate_json(dead[0][1][b"job"]).request_id == j.request_id
        assert await r.xlen(stream) == 0
    finally:
        await w.stop()
        await r.aclose()


async def test_drain_hands_unfinished_jobs_back_with_progress(redis_url, engine_factory):
    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))
    a = await start_worker(redis_url, engine_factory("paged"))
    j = job([4, 5, 6], max_tokens=300, temperature=0, ignore_eos=True)
    await r.xadd(keys.jobs_stream(MODEL), j.to_fields())
    while not await r.llen(keys.progress_key(j.request_id)):
        await asyncio.sleep(0.01)
    left = await a.drain(0.05)
    assert left == 1 and await a.hand_back() == 1
    await a.stop()
    entries = await r.xrange(keys.jobs_stream(MODEL))
    assert len(entries) == 1
    handed = Job.from_fields(entries[0][1])
    assert handed.request_id == j.request_id and handed.resume_token_ids
    b = await start_worker(redis_url, engine_factory("paged"))
    try:
        events = await collect(pubsub, {j.request_id})
        assert events[j.request_id][-1].completion_tokens == 300
    finally:
        await b.stop()
        await r.aclose()


async def test_worker_loads_a_model_live_while_serving_another(redis_url, engine_factory, tiny_artifacts):
    from protocol.messages import ControlMessage

    r = aioredis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel("gw-test"))

    def loader(name: str):
        return load_engine("paged", tiny_artifacts / name, "cpu", "float32", WorkerSettings()), "cpu", "float32"

    settings = WorkerSettings(redis_url=redis_url, worker_id="w-live", max_batch=8, heartbeat_interval=0.2)
    w = Worker(settings, loader=loader)
    w.add_model(MODEL, engine_factory("paged"), "cpu", "float32")
    await w.start()
    try:
        long_job = job([3, 4, 5], max_tokens=200, temperature=0, ignore_eos=True)
        await r.xadd(keys.jobs_stream(MODEL), long_job.to_fields())
        await r.publish(keys.CONTROL_CHANNEL, ControlMessage(action="load", model="tiny-gpt2").encode())
        for _ in range(600):  # loading takes seconds on a busy 2-core machine
            info = WorkerInfo.model_validate_json(await r.get(keys.worker_key(w.id)))
            if "tiny-gpt2" in info.models:
                break
            await asyncio.sleep(0.05)
        assert set(info.models) == {MODEL, "tiny-gpt2"}
        gpt2_job = job([1, 2], max_tokens=4, temperature=0, ignore_eos=True)
        gpt2_job.model = "tiny-gpt2"
        await r.xadd(keys.jobs_stream("tiny-gpt2"), gpt2_job.to_fields())
        events = await collect(pubsub, {long_job.request_id, gpt2_job.request_id})
        assert events[long_job.request_id][-1].completion_tokens == 200  # not dropped by the load
        assert events[gpt2_job.request_id][-1].completion_tokens == 4
        await r.publish(keys.CONTROL_CHANNEL, ControlMessage(action="unload", model="tiny-gpt2").encode())
        for _ in range(600):  # loading takes seconds on a busy 2-core machine
            info = WorkerInfo.model_validate_json(await r.get(keys.worker_key(w.id)))
            if info.models == [MODEL]:
                break
            await asyncio.sleep(0.05)
        assert info.models == [MODEL]
    finally:
        await w.stop()
        await r.aclose()

"""Fencing (worker/fencing.py) and the worker living through a Redis restart, against a real Redis.

The scripts are tested on their own first (who may write, idempotence, gaps), then a real worker whose
job is taken over under its feet (what a network partition does) and a worker whose Redis restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from launcher.redis_server import RedisProcess
from protocol import keys
from protocol.messages import EventBatch, Job, SamplingParams, TokenEvent
from protocol.settings import WorkerSettings
from worker.engine.loader import load_engine
from worker.fencing import Fence, Write, batch_frame
from worker.service import Worker

MODEL = "tiny-llama"
STREAM = keys.jobs_stream(MODEL)
GATEWAY = "gw-fence"


def make_job(max_tokens: int = 5) -> Job:
    return Job(request_id=uuid.uuid4().hex, gateway_id=GATEWAY, model=MODEL, prompt_token_ids=[3, 4, 5],
               params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def event_json(job: Job, seq: int, finish: str | None = None) -> str:
    return TokenEvent(request_id=job.request_id, seq=seq, token_ids=[seq], text=f"t{seq}",
                      finish_reason=finish).model_dump_json(exclude_defaults=True)


async def deliver(r: aioredis.Redis, consumer: str, job: Job) -> str:
    """Queue ``job`` and deliver it to ``consumer`` (XREADGROUP); its entry id."""
    await r.xadd(STREAM, job.to_fields())
    resp = await r.xreadgroup(keys.JOBS_GROUP, consumer, {STREAM: ">"}, count=1)
    return resp[0][1][0][0].decode()


@pytest.fixture
async def r(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.xgroup_create(STREAM, keys.JOBS_GROUP, id="0", mkstream=True)
    yield client
    await client.aclose()


def test_batch_frame_joins_events_into_an_event_batch():
    job = make_job()
    events = [event_json(job, 0), event_json(job, 1, "length")]
    head, tail = batch_frame()
    batch = EventBatch.decode(head + ",".join(events) + tail)
    assert batch == EventBatch(events=[TokenEvent.model_validate_json(e) for e in events])
    assert EventBatch.decode(head + tail).events == []


async def test_publish_writes_only_for_the_owner_once_and_without_gaps(r):
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.events_channel(GATEWAY))
    fence = Fence(r, "me", 60_000)
    mine, taken, gapped = make_job(), make_job(), make_job()
    ids = {j.request_id: await deliver(r, "me", j) for j in (mine, taken, gapped)}
    await r.xclaim(STREAM, keys.JOBS_GROUP, "other", 0, [ids[taken.request_id]], justid=True)

    def writes(seq: int, finish: str | None = None) -> list[Write]:
        return [Write(ids[j.request_id], 1, j.request_id, s, GATEWAY, finish is not None, event_json(j, s, finish))
                for j, s in ((mine, seq), (taken, seq), (gapped, seq + 1))]

    fenced = await fence.publish(STREAM, writes(0))
    assert fenced == {ids[taken.request_id]: "not_owner", ids[gapped.request_id]: "gap"}
    assert await fence.publish(STREAM, writes(0)) == fenced  # re-sent (a lost reply): written once
    assert await fence.publish(STREAM, writes(1, "length")) == fenced

    log = [TokenEvent.model_validate_json(e) for e in await r.lrange(keys.progress_key(mine.request_id), 0, -1)]
    assert [(e.seq, e.finish_reason) for e in log] == [(0, None), (1, "length")]
    assert 0 < await r.pttl(keys.progress_key(mine.request_id)) <= 60_000
    for j in (taken, gapped):
        assert not await r.exists(keys.progress_key(j.request_id))
    published = []
    while (msg := await pubsub.get_message(timeout=0.5)) is not None:
        if msg["type"] == "message":
            published.extend((e.request_id, e.seq) for e in EventBatch.decode(msg["data"]).events)
    assert published == [(mine.request_id, 0), (mine.request_id, 1)]
    # The finished job left the stream; the fenced ones are untouched.
    remaining = {e[0].decode() for e in await r.xrange(STREAM)}
    assert remaining == {ids[taken.request_id], ids[gapped.request_id]}
    await pubsub.aclose()


async def test_publish_after_the_stream_is_gone_is_fenced(r):
    fence = Fence(r, "me", 60_000)
    job = make_job()
    entry = await deliver(r, "me", job)
    await r.flushall()  # Redis restarted without its data (and without the script: NOSCRIPT reloads it)
    await r.script_flush()
    fenced = await fence.publish(STREAM, [Write(entry, 1, job.request_id, 0, GATEWAY, False, event_json(job, 0))])
    assert fenced == {entry: "not_owner"}
    assert not await r.exists(keys.progress_key(job.request_id))


async def test_a_job_lost_and_claimed_back_fences_off_the_old_run(r):
    """The delivery count is the fencing token: after losing a job and claiming it back, what the
    worker still held of its first run (delivery 1) cannot write; the new run (delivery 3) can."""
    fence = Fence(r, "me", 60_000)
    job = make_job()
    entry = await deliver(r, "me", job)
    await r.xclaim(STREAM, keys.JOBS_GROUP, "other", 0, [entry])  # delivery 2: taken over
    await r.xclaim(STREAM, keys.JOBS_GROUP, "me", 0, [entry])  # delivery 3: claimed back

    def write(deliveries: int) -> list[Write]:
        return [Write(entry, deliveries, job.request_id, 0, GATEWAY, False, event_json(job, 0))]

    assert await fence.publish(STREAM, write(1)) == {entry: "not_owner"}
    assert await fence.renew(STREAM, [(entry, 1)]) == {entry}
    assert not await r.exists(keys.progress_key(job.request_id))
    assert await fence.publish(STREAM, write(3)) == {}
    assert await fence.renew(STREAM, [(entry, 3)]) == set()
    assert await r.llen(keys.progress_key(job.request_id)) == 1


async def test_renew_claims_only_what_is_still_ours(r):
    fence = Fence(r, "me", 60_000)
    mine, taken = make_job(), make_job()
    a, b = await deliver(r, "me", mine), await deliver(r, "me", taken)
    await r.xclaim(STREAM, keys.JOBS_GROUP, "other", 0, [b], justid=True)
    await asyncio.sleep(0.05)
    assert await fence.renew(STREAM, [(a, 1), (b, 1)]) == {b}
    owners = {p["message_id"].decode(): (p["consumer"].decode(), p["time_since_delivered"])
              for p in await r.xpending_range(STREAM, keys.JOBS_GROUP, "-", "+", 10)}
    assert owners[a][0] == "me" and owners[a][1] < 50  # renewed: idle time reset
    assert owners[b][0] == "other"  # never taken back


async def test_hand_back_requeues_only_what_is_still_ours(r):
    fence = Fence(r, "me", 60_000)
    mine, taken = make_job(), make_job()
    a, b = await deliver(r, "me", mine), await deliver(r, "me", taken)
    await r.xclaim(STREAM, keys.JOBS_GROUP, "other", 0, [b], justid=True)
    handed = mine.model_copy(update={"resume_token_ids": [1, 2]})
    assert await fence.hand_back(STREAM, [(a, 1, handed.to_fields()), (b, 1, taken.to_fields())]) == {b}
    entries = {e[0].decode(): Job.from_fields(e[1]) for e in await r.xrange(STREAM)}
    assert a not in entries and b in entries and len(entries) == 2
    new = next(j for eid, j in entries.items() if eid != b)
    assert new.request_id == mine.request_id and new.resume_token_ids == [1, 2]


@pytest.fixture(scope="module")
def engine_factory(tiny_artifacts):
    def make():
        return load_engine("paged", tiny_artifacts / MODEL, "cpu", "float32",
                           WorkerSettings(max_batch=4, kv_cache_memory="16MiB"))
    return make


async def start_worker(redis_url: str, engine, **kw) -> Worker:
    settings = WorkerSettings(redis_url=redis_url, worker_id=f"w-{uuid.uuid4().hex[:6]}", max_batch=4, **kw)
    w = Worker(settings)
    w.add_model(MODEL, engine, "cpu", "float32")
    await w.start()
    return w


async def wait_for(what: str, check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.02)


async def test_worker_whose_job_is_taken_over_writes_nothing_more_for_it(r, redis_url, engine_factory):
    """What a partition does, without one: the job's entry is claimed by another consumer while the
    worker runs it. Leases are not renewed during the test (long heartbeat interval), so the publish
    script alone must notice: no event of the worker's lands after the claim, and it drops the job."""
    w = await start_worker(redis_url, engine_factory(), heartbeat_interval=600, claim_idle_ms=600_000)
    try:
        job = make_job(max_tokens=500)
        await r.xadd(STREAM, job.to_fields())
        log_key = keys.progress_key(job.request_id)
        await wait_for("the first events", lambda: r.llen(log_key))
        entry = next(iter(w.servers[MODEL].jobs.values())).entry_id
        async with r.pipeline(transaction=True) as p:  # claimed and measured in one step
            p.xclaim(STREAM, keys.JOBS_GROUP, "other", 0, [entry], justid=True)
            p.llen(log_key)
            _, length_at_claim = await p.execute()
        assert length_at_claim < 500  # still generating when claimed

        async def dropped() -> bool:
            return not w.servers[MODEL].jobs

        await wait_for("the worker to drop the job", dropped)
        assert w.fenced == 1
        assert await r.llen(log_key) == length_at_claim
        assert (await r.xpending_range(STREAM, keys.JOBS_GROUP, "-", "+", 10))[0]["consumer"] == b"other"
    finally:
        await w.stop()


async def test_worker_serves_again_after_redis_restarts_empty(tiny_artifacts, tmp_path, engine_factory):
    """Redis restarts without its data (consumer group and scripts gone): the worker reconnects, creates
    the group again and serves the next job; the job it was running is dropped, not stuck."""
    server = RedisProcess(tmp_path / "redis").start()
    r = aioredis.Redis.from_url(server.url)
    w = await start_worker(server.url, engine_factory(), heartbeat_interval=0.2)
    try:
        before = make_job(max_tokens=500)
        await r.xadd(STREAM, before.to_fields())
        await wait_for("the first events", lambda: r.llen(keys.progress_key(before.request_id)))
        server.stop()
        server.start()
        await r.aclose()
        r = aioredis.Redis.from_url(server.url)  # not the pool of connections to the old server

        async def freed() -> bool:
            return not w.servers[MODEL].jobs

        await wait_for("the job of the lost Redis to be dropped", freed)
        after = make_job(max_tokens=5)
        await r.xadd(STREAM, after.to_fields())

        async def finished() -> bool:
            log = await r.lrange(keys.progress_key(after.request_id), 0, -1)
            return bool(log) and TokenEvent.model_validate_json(log[-1]).finish_reason == "length"

        await wait_for("the job after the restart to finish", finished)
        await wait_for("the heartbeat", lambda: r.exists(keys.worker_key(w.id)))
    finally:
        await w.stop()
        await r.aclose()
        server.stop()

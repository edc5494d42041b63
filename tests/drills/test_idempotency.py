"""Drill 7 of docs/reliability.md: Idempotency-Key replay and re-attach, Last-Event-ID resume.

The whole system as ``spindle up`` runs it (gateway, two workers with the real paged engine on a tiny
model, Redis). What must hold:
- a retried request with the same key gets the first response byte for byte (``Idempotent-Replayed``);
- the same key with another body is a 422 in the OpenAI error shape;
- concurrent duplicates compute once: one job (one event log) for all of them, one answer;
- a streaming duplicate of a stream gets the whole stream, identical to the original;
- a client that drops mid-stream and reconnects with ``Last-Event-ID`` (same key, or
  ``GET /v1/streams/{id}``) gets exactly the rest: what it read plus the rest is the uninterrupted
  stream, and the text is an undisturbed run's text. Dropping did not cancel the job.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import redis

from protocol import keys
from protocol.messages import TokenEvent
from tests.drills.conftest import DRILL_MODEL, wait_workers

pytestmark = pytest.mark.drill
MAX_TOKENS = 48
DUPLICATES = 6


def body(prompt: str, stream: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": DRILL_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"drill-{uuid.uuid4().hex}"}


def blocks_of(raw: str) -> list[str]:
    """The SSE events of a body, each with its closing blank line."""
    return [f"{b}\n\n" for b in raw.split("\n\n") if b]


def text_of(blocks: list[str]) -> str:
    out = []
    for b in blocks:
        data = b.strip().split("\n")[-1].removeprefix("data: ")
        if data != "[DONE]":
            out += [c["text"] for c in json.loads(data)["choices"]]
    return "".join(out)


async def read_stream(client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str],
                      json_body: dict | None = None, stop_after: int | None = None) -> tuple[httpx.Response, list[str]]:
    """The stream's events; with ``stop_after``, hang up once that many have arrived."""
    buf, blocks = "", []
    async with client.stream(method, url, json=json_body, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for piece in resp.aiter_text():
            buf += piece
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                blocks.append(f"{block}\n\n")
                if stop_after is not None and len(blocks) >= stop_after:
                    return resp, blocks  # leaving the block closes the connection mid-stream
    assert buf == ""
    return resp, blocks


def event_logs(r: redis.Redis) -> set[str]:
    return {k.decode() for k in r.scan_iter(keys.progress_key("*"), count=1000)}


def log_of(r: redis.Redis, request_id: str) -> list[TokenEvent]:
    return [TokenEvent.model_validate_json(e) for e in r.lrange(keys.progress_key(request_id), 0, -1)]


@pytest.fixture
def system(two_worker_system):
    wait_workers(two_worker_system, 2)
    return two_worker_system


def test_replay_mismatch_and_concurrent_duplicates(system):
    r = redis.Redis.from_url(system.redis_url)
    once, many = key(), key()

    async def run():
        async with httpx.AsyncClient(base_url=system.gateway, timeout=120) as client:
            first = await client.post("/v1/completions", json=body("Good morrow, cousin"), headers=once)
            again = await client.post("/v1/completions", json=body("Good morrow, cousin"), headers=once)
            other = await client.post("/v1/completions", json=body("Good night, cousin"), headers=once)
            before = event_logs(r)
            dups = await asyncio.gather(*(client.post("/v1/completions", json=body("Once more, dear friends"),
                                                      headers=many) for _ in range(DUPLICATES)))
            return first, again, other, before, dups

    first, again, other, before, dups = asyncio.run(run())
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert set(other.json()["error"]) == {"message", "type", "param", "code"}

    print(f"\ndrill 7 (idempotency): replay identical: {again.content == first.content}, other body -> "
          f"{other.status_code}, {DUPLICATES} concurrent duplicates -> "
          f"statuses {sorted({d.status_code for d in dups})}, "
          f"{len({d.content for d in dups})} distinct body, "
          f"{sum('idempotent-replayed' not in d.headers for d in dups)} computed, "
          f"{len(event_logs(r) - before)} job(s) run")
    assert [d.status_code for d in dups] == [200] * DUPLICATES
    assert len({d.content for d in dups}) == 1
    assert sum("idempotent-replayed" not in d.headers for d in dups) == 1  # one ran, the others waited
    request_id = dups[0].json()["id"]
    assert event_logs(r) - before == {keys.progress_key(request_id)}  # one job for all of them
    assert log_of(r, request_id)[-1].completion_tokens == MAX_TOKENS


def test_streaming_reattach_and_resume(system):
    r = redis.Redis.from_url(system.redis_url)
    attach, drop = key(), key()

    async def run():
        async with httpx.AsyncClient(base_url=system.gateway, timeout=120) as client:
            # A duplicate sent while the original streams gets the whole stream.
            original_task = asyncio.create_task(read_stream(client, "POST", "/v1/completions", attach,
                                                            body("Friends, Romans", True)))
            _resp, first_events = await read_stream(client, "POST", "/v1/completions", attach,
                                                    body("Friends, Romans", True))
            _resp, original = await original_task
            # A client reads a few events, hangs up, and resumes from the last id it saw.
            _resp, head = await read_stream(client, "POST", "/v1/completions", drop, body("To be, or not", True),
                                            stop_after=4)
            last_id = head[-1].split("\n", 1)[0].removeprefix("id: ")
            resumed_resp, tail = await read_stream(client, "POST", "/v1/completions",
                                                   {**drop, "Last-Event-ID": last_id}, body("To be, or not", True))
            stream_id = last_id.rpartition(":")[0]
            _resp, by_id = await read_stream(client, "GET", f"/v1/streams/{stream_id}", {"Last-Event-ID": last_id})
            _resp, whole = await read_stream(client, "POST", "/v1/completions", drop, body("To be, or not", True))
            _resp, undisturbed = await read_stream(client, "POST", "/v1/completions", {},
                                                   body("To be, or not", True))
            return first_events, original, head, resumed_resp, tail, by_id, whole, undisturbed, stream_id

    first_events, original, head, resumed_resp, tail, by_id, whole, undisturbed, stream_id = asyncio.run(run())
    # Re-attach: both clients got the same bytes, and only one job ran.
    assert original == first_events and original[-1].endswith("data: [DONE]\n\n")
    attached_id = json.loads(original[0].split("data: ", 1)[1])["id"]
    assert len(text_of(original)) > 0 and log_of(r, attached_id)[-1].finish_reason == "length"

    # Resume: no gap, no duplicate.
    assert resumed_resp.headers["idempotent-replayed"] == "true"
    assert head + tail == whole
    assert tail == by_id
    assert text_of(head + tail) == text_of(undisturbed)
    ids = [int(b.split("\n", 1)[0].rpartition(":")[2]) for b in whole]
    assert ids == sorted(set(ids))
    # Hanging up did not cancel the job: it ran to max_tokens.
    assert log_of(r, stream_id)[-1].finish_reason == "length"
    assert log_of(r, stream_id)[-1].completion_tokens == MAX_TOKENS

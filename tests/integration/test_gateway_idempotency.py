"""Idempotency-Key and stream resume in the gateway, with the worker's side played by the test.

``LoggedWorker`` writes each event to the request's event log and publishes it in one MULTI/EXEC,
as the real worker does, so each test decides exactly when an event exists: a re-attached or resumed
client that has read the events already logged has subscribed, and what is published after that
reaches it live. (tests/drills/test_idempotency.py runs the same promises with real workers.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

import httpx
import openai
import pytest

from gateway.idempotency import STALE_AFTER_S, fingerprint, scope_of
from protocol import keys
from protocol.messages import EventBatch, IdempotencyMeta, Job, TokenEvent
from tests.integration.gateway_harness import MODEL, FakeWorker, gateway_settings, running_gateway

PIECES = ["Now", " is", " the", " winter", " of", " our"]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}


class LoggedWorker(FakeWorker):
    def publish_logged(self, job: Job, events: list[TokenEvent]) -> None:
        pipe = self.r.pipeline(transaction=True)
        for ev in events:
            pipe.rpush(keys.progress_key(job.request_id), ev.model_dump_json())
        pipe.expire(keys.progress_key(job.request_id), 900)
        pipe.publish(keys.events_channel(job.gateway_id), EventBatch(events=events).encode())
        pipe.execute()


@pytest.fixture
def worker(redis_url):
    w = LoggedWorker(redis_url)
    w.heartbeat()
    w.ensure_group()
    return w


@pytest.fixture
def gw(redis_url, tiny_artifacts, tmp_path):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path)) as g:
        yield g


@pytest.fixture
def gw2(redis_url, tiny_artifacts, tmp_path):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path)) as g:
        yield g


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


class Reader:
    """One streaming request read event by event."""

    def __init__(self, client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str],
                 body: dict | None = None):
        self.cm = client.stream(method, url, headers=headers, json=body)
        self.events: list[str] = []
        self.resp: httpx.Response | None = None
        self._buf = ""
        self._chunks = None

    async def open(self) -> Reader:
        self.resp = await self.cm.__aenter__()
        assert self.resp.status_code == 200, await self.resp.aread()
        self._chunks = self.resp.aiter_text()
        return self

    async def read(self, n: int | None = None) -> list[str]:
        """Until ``n`` events in all (None: the end)."""
        while n is None or len(self.events) < n:
            while "\n\n" in self._buf:
                block, self._buf = self._buf.split("\n\n", 1)
                self.events.append(f"{block}\n\n")
                if n is not None and len(self.events) >= n:
                    return self.events
            try:
                self._buf += await self._chunks.__anext__()
            except StopAsyncIteration:
                assert self._buf == "" and n is None, (self._buf, n, self.events)
                break
        return self.events

    async def close(self) -> None:
        await self.cm.__aexit__(None, None, None)


def last_id(events: list[str]) -> str:
    return events[-1].split("\n", 1)[0].removeprefix("id: ")


def content(events: list[str]) -> str:
    out = []
    for e in events:
        data = e.strip().split("\n")[-1].removeprefix("data: ")
        if data != "[DONE]":
            out += [c["delta"].get("content") or "" for c in json.loads(data)["choices"]]
    return "".join(out)


async def take_job(worker: LoggedWorker) -> tuple[str, Job]:
    return await asyncio.to_thread(worker.take_job)


def test_reattach_on_another_gateway_then_live(gw, gw2, worker):
    """A duplicate sent to another gateway gets the events logged so far, then the rest live."""
    headers = idem()

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            first = await Reader(client, "POST", gw.url + "/v1/chat/completions", headers, CHAT).open()
            entry, job = await take_job(worker)
            events = worker.events_for(job, PIECES, "length")
            worker.publish_logged(job, events[:3])
            await first.read(4)  # the role chunk and 3 tokens
            second = await Reader(client, "POST", gw2.url + "/v1/chat/completions", headers, CHAT).open()
            assert second.resp.headers["idempotent-replayed"] == "true"
            assert await second.read(4) == first.events  # from the log: so it is subscribed now
            worker.publish_logged(job, events[3:])  # reaches the second gateway only through its pub/sub
            worker.finish(job, entry)
            a, b = await first.read(), await second.read()
            await first.close()
            await second.close()
            return a, b, job

    a, b, job = asyncio.run(run())
    assert a == b and content(a) == "".join(PIECES) and a[-1].endswith("data: [DONE]\n\n")
    assert worker.queued() == 0 and not worker.cancelled(job.request_id)


def test_drop_then_resume_live_with_last_event_id(gw, worker):
    """A client hangs up; the job goes on; Last-Event-ID gets exactly the rest, partly live."""
    headers = idem()
    body = {**CHAT, "stream_options": {"include_usage": True}}

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            first = await Reader(client, "POST", gw.url + "/v1/chat/completions", headers, body).open()
            entry, job = await take_job(worker)
            events = worker.events_for(job, PIECES, "length")
            worker.publish_logged(job, events[:3])
            head = list(await first.read(3))  # role, 2 tokens; then the client hangs up
            await first.close()
            resumed = await Reader(client, "POST", gw.url + "/v1/chat/completions",
                                   {**headers, "Last-Event-ID": last_id(head)}, body).open()
            await resumed.read(1)  # the third token, from the log
            by_id = await Reader(client, "GET", f"{gw.url}/v1/streams/{job.request_id}",
                                 {"Last-Event-ID": last_id(head)}).open()
            await by_id.read(1)
            worker.publish_logged(job, events[3:])
            worker.finish(job, entry)
            tail, tail_by_id = await resumed.read(), await by_id.read()
            await resumed.close()
            await by_id.close()
            whole = await Reader(client, "POST", gw.url + "/v1/chat/completions", headers, body).open()
            await whole.read()
            return head, tail, tail_by_id, whole.events, job

    head, tail, tail_by_id, whole, job = asyncio.run(run())
    assert head + tail == whole  # the owner's rendering and the re-attached one agree, byte for byte
    assert tail == tail_by_id
    assert content(whole) == "".join(PIECES)
    usage = json.loads(whole[-2].strip().split("\n")[-1].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == len(PIECES)
    assert not worker.cancelled(job.request_id)  # hanging up did not cancel a keyed stream


def test_openai_client_replays_a_stream(gw, worker):
    """The official client ignores the id lines; a retried stream is the same chunks, one job."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    headers = idem()

    def respond():
        entry, job = worker.take_job()
        worker.publish_logged(job, worker.events_for(job, PIECES, "length"))
        worker.finish(job, entry)

    async def run():
        responder = asyncio.create_task(asyncio.to_thread(respond))
        first = await asyncio.to_thread(lambda: list(client.completions.create(
            model=MODEL, prompt="x", max_tokens=10, stream=True, extra_headers=headers)))
        await responder
        again = await asyncio.to_thread(lambda: list(client.completions.create(
            model=MODEL, prompt="x", max_tokens=10, stream=True, extra_headers=headers)))
        return first, again

    first, again = asyncio.run(run())
    assert [c.model_dump() for c in first] == [c.model_dump() for c in again]
    assert "".join(c.choices[0].text for c in first) == "".join(PIECES)
    assert worker.queued() == 0


def test_failed_request_gives_its_key_up(gw, worker):
    headers = idem()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5}

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            call = asyncio.create_task(client.post(gw.url + "/v1/completions", json=body, headers=headers))
            entry, job = await take_job(worker)
            worker.publish_logged(job, [TokenEvent(request_id=job.request_id, seq=0, finish_reason="error",
                                                   error="boom")])
            worker.finish(job, entry)
            failed = await call
            call = asyncio.create_task(client.post(gw.url + "/v1/completions", json=body, headers=headers))
            entry, retry_job = await take_job(worker)
            worker.publish_logged(retry_job, worker.events_for(retry_job, PIECES[:2], "stop"))
            worker.finish(retry_job, entry)
            return failed, await call, job, retry_job

    failed, retried, job, retry_job = asyncio.run(run())
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert retried.status_code == 200 and retried.json()["choices"][0]["text"] == "".join(PIECES[:2])
    assert retry_job.request_id != job.request_id and "idempotent-replayed" not in retried.headers


def test_bad_keys_and_unknown_streams(gw, worker):
    url = gw.url
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5}
    too_long = httpx.post(url + "/v1/completions", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "invalid_idempotency_key"
    orphan_resume = httpx.post(url + "/v1/completions", json={**body, "stream": True},
                               headers={"Last-Event-ID": "cmpl-1:3"})
    assert orphan_resume.status_code == 400 and orphan_resume.json()["error"]["param"] == "Last-Event-ID"
    unknown = httpx.post(url + "/v1/completions", json={**body, "stream": True},
                         headers={**idem(), "Last-Event-ID": "cmpl-1:3"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "stream_not_found"
    assert httpx.get(url + "/v1/streams/cmpl-nothing").status_code == 404
    native = httpx.post(url + "/stream", json={"prompt": "x"}, headers=idem())
    assert native.status_code == 400 and native.json()["error"]["code"] == "idempotency_unsupported"
    assert worker.queued() == 0  # none of them queued a job


def test_keys_are_scoped_per_api_key(redis_url, tiny_artifacts, tmp_path, worker):
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, api_keys="alpha,beta")
    headers = idem()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5}
    with running_gateway(settings) as g:

        async def run():
            async with httpx.AsyncClient(timeout=30) as client:
                out = []
                for api_key in ("alpha", "beta", "alpha"):
                    call = asyncio.create_task(client.post(
                        g.url + "/v1/completions", json=body,
                        headers={**headers, "Authorization": f"Bearer {api_key}"}))
                    if api_key == "beta" or not out:
                        entry, job = await take_job(worker)
                        worker.publish_logged(job, worker.events_for(job, [api_key], "stop"))
                        worker.finish(job, entry)
                    out.append(await call)
                stream = await client.get(f"{g.url}/v1/streams/{out[0].json()['id']}",
                                          headers={"Authorization": "Bearer beta"})
                return out, stream

        (alpha, beta, alpha_again), stream = asyncio.run(run())
    assert alpha.json()["choices"][0]["text"] == "alpha" and beta.json()["choices"][0]["text"] == "beta"
    assert alpha_again.content == alpha.content and alpha_again.headers["idempotent-replayed"] == "true"
    assert stream.status_code == 404  # not a stream, and not beta's


def test_key_left_pending_by_a_dead_gateway_is_claimed_again(gw, worker):
    """A record still pending well past its deadline (its gateway died) does not block the key for ever."""
    headers = idem()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5}
    raw = json.dumps(body).encode()
    name = keys.idempotency_key(scope_of("ip:127.0.0.1"),
                                hashlib.sha256(headers["Idempotency-Key"].encode()).hexdigest()[:32])
    meta = IdempotencyMeta(kind="text", model=MODEL, gateway_id="gw-dead")
    worker.r.hset(name, mapping={"fp": fingerprint("POST", "/v1/completions", raw), "rid": "cmpl-dead",
                                 "state": "pending", "meta": meta.model_dump_json(),
                                 "deadline": time.time() - STALE_AFTER_S - 1})

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            call = asyncio.create_task(client.post(gw.url + "/v1/completions", content=raw,
                                                   headers={**headers, "Content-Type": "application/json"}))
            entry, job = await take_job(worker)
            worker.publish_logged(job, worker.events_for(job, ["ok"], "stop"))
            worker.finish(job, entry)
            return await call

    r = asyncio.run(run())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert worker.r.hget(name, "rid").decode() == r.json()["id"]

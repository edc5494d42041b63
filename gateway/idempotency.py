"""``Idempotency-Key``: a POST sent twice (a client retrying after a timeout, a dropped connection)
runs once.

The key is scoped to the caller (its API key, or its address without auth) and kept in Redis for
``IDEMPOTENCY_TTL`` (``keys.idempotency_key``, fields ``keys.IDEM_FIELDS``), with a fingerprint
(SHA-256) of the method, path and canonical JSON body. A request with a key:

* the key is new: the request is validated and tokenized, then claims the key in one Lua script
  (``CLAIM_LUA``: exactly one of any number of concurrent duplicates wins) and runs. The job is no
  longer tied to its client: a task of its own collects it (a stream is rendered onto a ``Tape`` the
  client's response follows), so a client that goes away does not cancel it. When the job finishes,
  its response (at most ``IDEMPOTENCY_MAX_RESPONSE_BYTES``) is stored in the record; when it fails
  (a 5xx, a timeout), the key is given up, so a retry runs it again.
* the key is known, with another body: 422 ``idempotency_key_reused``.
* the key is known and finished: the stored response, byte for byte, with ``Idempotent-Replayed:
  true`` (a stream past its ``Last-Event-ID`` only).
* the key is known and still running: a non-streaming duplicate waits for the response; a streaming
  one re-attaches to the job (gateway/resume.py: its event log, then live), from any gateway.
* the key's request was abandoned (still "pending" ``STALE_AFTER_S`` past its deadline: its gateway
  died): the next request with the key claims it again.

``GET /v1/streams/{request_id}`` resumes a stream started with a key, by its id (the caller's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from gateway import resume, sse
from gateway.errors import bad_request
from gateway.generation import Generation, Outcome, unless_disconnected
from gateway.openai_format import ChunkMaker
from protocol import keys
from protocol.errors import APIError
from protocol.messages import IdempotencyMeta

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("gateway.idempotency")
T = TypeVar("T")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
STALE_AFTER_S = 30.0  # a record still pending this long after its deadline lost its gateway
POLL_S = (0.02, 0.25)  # a waiting duplicate polls the record from the first to the second, doubling

# KEYS: record, stream pointer. ARGV: fp, rid, meta, deadline, ttl ms, now, stale after s.
# Returns false when claimed, else the record (HGETALL) that holds the key.
CLAIM_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'deadline', 'fp')
if cur[1] then
  local abandoned = cur[1] == 'pending' and cur[3] == ARGV[1]
    and tonumber(cur[2]) + tonumber(ARGV[7]) < tonumber(ARGV[6])
  if not abandoned then
    return redis.call('HGETALL', KEYS[1])
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'rid', ARGV[2], 'state', 'pending', 'meta', ARGV[3],
           'deadline', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], KEYS[1], 'PX', ARGV[5])
return false
"""
# KEYS: record. ARGV: rid, status, content type, stored (1/0), body. Only the claimer's own record.
COMPLETE_LUA = """
if redis.call('HGET', KEYS[1], 'rid') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[2], 'ctype', ARGV[3], 'stored', ARGV[4],
           'body', ARGV[5])
return 1
"""
# KEYS: record, stream pointer. ARGV: rid.
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'rid') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Record:
    """One key's record (``keys.IDEM_FIELDS``)."""

    fp: str
    rid: str
    state: str
    meta: IdempotencyMeta
    deadline: float
    status: int = 0
    ctype: str = ""
    stored: bool = False
    body: bytes = b""

    @classmethod
    def parse(cls, fields: dict[Any, Any]) -> Record | None:
        f = {_text(k): v for k, v in fields.items()}
        if "rid" not in f:
            return None
        return cls(fp=_text(f["fp"]), rid=_text(f["rid"]), state=_text(f["state"]),
                   meta=IdempotencyMeta.model_validate_json(f["meta"]), deadline=float(f["deadline"]),
                   status=int(f.get("status") or 0), ctype=_text(f.get("ctype") or b""),
                   stored=f.get("stored") in (b"1", "1"), body=bytes(f.get("body") or b""))

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    def abandoned(self) -> bool:
        return self.pending and self.deadline + STALE_AFTER_S < time.time()


class IdempotencyStore:
    """The records in Redis, and the tasks that finish keyed requests whatever their clients do."""

    def __init__(self, redis: aioredis.Redis, ttl: float, max_response_bytes: int):
        self.redis = redis
        self.ttl_ms = int(ttl * 1000)
        self.max_response_bytes = max_response_bytes
        self._claim = redis.register_script(CLAIM_LUA)
        self._complete = redis.register_script(COMPLETE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._tasks: set[asyncio.Task] = set()

    async def get(self, key: str) -> Record | None:
        return Record.parse(await self.redis.hgetall(key))

    async def claim(self, key: str, fp: str, rid: str, meta: IdempotencyMeta, deadline: float) -> Record | None:
        """None when this request now holds the key, else the record of the one that does."""
        got = await self._claim(keys=[key, keys.stream_key(rid)],
                                args=[fp, rid, meta.model_dump_json(), deadline, self.ttl_ms, time.time(),
                                      STALE_AFTER_S])
        if got is None:
            return None
        record = Record.parse(dict(zip(got[::2], got[1::2], strict=True)))
        if record is None:
            raise RedisError(f"unreadable idempotency record {key}")
        return record

    async def complete(self, key: str, rid: str, status: int, ctype: str, body: bytes) -> None:
        stored = len(body) <= self.max_response_bytes
        await self._complete(keys=[key], args=[rid, status, ctype, int(stored), body if stored else b""])

    async def release(self, key: str, rid: str) -> None:
        await self._release(keys=[key, keys.stream_key(rid)], args=[rid])

    async def alive(self, key: str, rid: str) -> bool:
        """The record still belongs to request ``rid``."""
        return _text(await self.redis.hget(key, "rid") or b"") == rid

    async def record_of_stream(self, request_id: str) -> str | None:
        name = await self.redis.get(keys.stream_key(request_id))
        return None if name is None else _text(name)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` to its end, independent of the request that started it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None and not isinstance(e, APIError):
            log.error("a keyed request's task failed", exc_info=e)


def store_for(request: Request, gw: Gateway) -> IdempotencyStore:
    state = request.app.state
    store: IdempotencyStore | None = getattr(state, "idempotency", None)
    if store is None or store.redis is not gw.redis:
        store = IdempotencyStore(gw.redis, gw.settings.idempotency_ttl, gw.settings.idempotency_max_response_bytes)
        state.idempotency = store
    return store


def scope_of(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def fingerprint(method: str, path: str, body: bytes) -> str:
    """SHA-256 of the method, path and body, the body as canonical JSON (key order and spacing
    do not matter)."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _not_found(message: str) -> APIError:
    return APIError(404, message, "not_found_error", None, "stream_not_found")


def _unavailable_response() -> APIError:
    return APIError(409, "The response to this request was too large to keep for replay, or is no longer "
                         "kept; send the request again with a new Idempotency-Key",
                    "invalid_request_error", HEADER, "idempotency_response_unavailable")


async def _once(text: str) -> AsyncIterator[str]:
    yield text


class Idempotent:
    """One request that carries an ``Idempotency-Key`` (or names a stream to resume)."""

    def __init__(self, request: Request, gw: Gateway, store: IdempotencyStore, key: str, fp: str,
                 last_event_id: str | None):
        self.request = request
        self.gw = gw
        self.store = store
        self.key = key
        self.fp = fp
        self.last_event_id = last_event_id
        self.rid: str | None = None  # set once this request holds the key

    @classmethod
    async def open(cls, request: Request, gw: Gateway, identity: str, *, stream: bool = False,
                   resumable: bool = True) -> Idempotent | None:
        """The request's key (None without the header). 400 for a malformed key, or a key on a
        stream that cannot be resumed (``resumable=False``)."""
        raw = request.headers.get(HEADER)
        last_event_id = request.headers.get("last-event-id")
        if raw is None:
            if last_event_id is not None:
                raise bad_request("Last-Event-ID needs the stream's Idempotency-Key (or use GET /v1/streams/{id})",
                                  param="Last-Event-ID", code="invalid_last_event_id")
            return None
        if not KEY_RE.match(raw):
            raise bad_request("Idempotency-Key must be 1 to 255 printable ASCII characters", param=HEADER,
                              code="invalid_idempotency_key")
        if stream and not resumable:
            raise bad_request("Idempotency-Key is not supported on this endpoint's streams; use it without "
                              "stream, or on /v1/completions or /v1/chat/completions", param=HEADER,
                              code="idempotency_unsupported")
        key = keys.idempotency_key(scope_of(identity), hashlib.sha256(raw.encode()).hexdigest()[:32])
        fp = fingerprint(request.method, request.url.path, await request.body())
        return cls(request, gw, store_for(request, gw), key, fp, last_event_id)

    # -- a key already used -------------------------------------------------------------------
    async def existing(self) -> Response | None:
        """The answer when the key is already held (a replay, a re-attach, a 422); None: go on."""
        record = await self.store.get(self.key)
        if record is None:
            if self.last_event_id is not None:
                raise _not_found("No stream to resume for this Idempotency-Key (it expired, or the request "
                                 "failed and may be sent again without Last-Event-ID)")
            return None
        return await self._answer(record)

    async def claim(self, rid: str, meta: IdempotencyMeta, deadline: float) -> Response | None:
        """Hold the key for request ``rid`` (None), or the answer of the request that holds it."""
        while True:
            record = await self.store.claim(self.key, self.fp, rid, meta, deadline)
            if record is None:
                self.rid = rid
                return None
            answer = await self._answer(record)
            if answer is not None:
                return answer

    async def _answer(self, record: Record) -> Response | None:
        while True:
            if record.fp != self.fp:
                raise APIError(422, "This Idempotency-Key was already used with a different request; use a new "
                                    "key for a new request", "invalid_request_error", HEADER, "idempotency_key_reused")
            if record.abandoned():
                return None
            if record.meta.stream:
                return await self.stream_of(record)
            if not record.pending:
                if not record.stored:
                    raise _unavailable_response()
                return Response(record.body, status_code=record.status, media_type=record.ctype,
                                headers={REPLAYED_HEADER: "true"})
            waited = await unless_disconnected(self.request, self._wait(record))
            if waited is None:  # the request failed and gave the key up: this one runs it
                return None
            record = waited

    async def _wait(self, record: Record) -> Record | None:
        """The record once it is no longer the same pending request's (None: gone)."""
        delay = POLL_S[0]
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_S[1])
            now = await self.store.get(self.key)
            if now is None or now.rid != record.rid or not now.pending or now.abandoned():
                return now

    async def stream_of(self, record: Record) -> sse.EventStreamResponse:
        """A keyed stream past the client's ``Last-Event-ID``: stored, or re-attached to its job."""
        after = resume.parse_last_event_id(self.last_event_id, record.rid)
        headers = {REPLAYED_HEADER: "true"}
        source = "stored response" if not record.pending and record.stored else "event log, then live"
        log.info("stream %s resumed after %s from its %s", record.rid, after, source,
                 extra={"request_id": record.rid})
        if not record.pending:
            if record.stored:
                return sse.EventStreamResponse(_once(resume.events_after(record.body.decode(), after)),
                                               headers=headers)
            if not await resume.log_is_complete(self.gw.redis, record.rid):
                raise _unavailable_response()
        meta, s = record.meta, self.gw.settings
        events = resume.logged_events(self.gw.redis, s.redis_url, record.rid, meta.gateway_id,
                                      record.deadline + 5, s.event_timeout,
                                      lambda: self.store.alive(self.key, record.rid))
        chunks = ChunkMaker(record.rid, meta.model, meta.created, meta.kind == "chat", meta.include_usage)
        return sse.EventStreamResponse(resume.encoded(resume.openai_stream(events, chunks, meta.prompt_tokens),
                                                      record.rid, after), headers=headers)

    # -- the request that holds the key ---------------------------------------------------------
    async def _settle(self, ok: bool, ctype: str, body: bytes) -> None:
        """Store the response (``ok``), or give the key up so that a retry runs the request again."""
        assert self.rid is not None
        try:
            if ok:
                await self.store.complete(self.key, self.rid, 200, ctype, body)
            else:
                await self.store.release(self.key, self.rid)
        except (RedisError, OSError) as e:  # the record goes stale after the deadline: a retry re-runs it
            log.warning("could not settle idempotency record of %s: %s", self.rid, e)

    async def settle_failed(self) -> None:
        """The request failed before its job ran: free the key."""
        if self.rid is not None:
            await self._settle(False, "", b"")

    def give_up(self) -> None:
        """``settle_failed`` in the background (for a request being cancelled)."""
        if self.rid is not None:
            self.store.spawn(self._settle(False, "", b""))

    async def own_json(self, gen: Generation, build: Callable[[Outcome], dict[str, Any]]) -> Response:
        async def produce() -> bytes:
            body, ok = b"", False
            try:
                body = JSONResponse(build(await gen.collect())).body
                ok = True
            finally:
                gen.close()
                await self._settle(ok, "application/json", body)
            return body

        body = await asyncio.shield(self.store.spawn(produce()))
        return Response(body, media_type="application/json")

    def own_stream(self, gen: Generation, events: AsyncGenerator[resume.StreamEvent, None]) -> sse.EventStreamResponse:
        tape = resume.Tape()

        async def produce() -> None:
            try:
                async for text in resume.encoded(events, gen.request_id):
                    tape.add(text)
            finally:
                try:
                    gen.close()
                    await self._settle(gen.finish_reason is not None, "text/event-stream", tape.text().encode())
                finally:
                    tape.end()

        self.store.spawn(produce())
        return sse.EventStreamResponse(tape.follow())


# -- what the routes call, with or without a key --------------------------------------------------
async def submitted(idem: Idempotent | None, work: Awaitable[Generation]) -> Generation:
    """The submitted job; a failure to submit gives the key up (before the client hears of a refusal,
    so that its retry runs)."""
    try:
        return await work
    except APIError:
        if idem is not None:
            await idem.settle_failed()
        raise
    except BaseException:
        if idem is not None:
            idem.give_up()
        raise


async def respond_json(idem: Idempotent | None, request: Request, gen: Generation,
                       build: Callable[[Outcome], dict[str, Any]]) -> Response:
    """A non-streaming response. Without a key the job is cancelled if the client goes away."""
    if idem is not None:
        return await idem.own_json(gen, build)
    try:
        out = await unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    return JSONResponse(build(out))


def respond_stream(idem: Idempotent | None, gen: Generation,
                   events: AsyncGenerator[resume.StreamEvent, None]) -> sse.EventStreamResponse:
    """An OpenAI stream. Without a key the job is cancelled if the client goes away."""
    if idem is not None:
        return idem.own_stream(gen, events)

    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(resume.encoded(events, gen.request_id)) as texts:
                async for text in texts:
                    yield text
        finally:
            gen.close()

    return sse.EventStreamResponse(body())


async def resume_stream(request: Request, gw: Gateway, identity: str, stream_id: str) -> sse.EventStreamResponse:
    """``GET /v1/streams/{stream_id}``: the caller's keyed stream, past ``Last-Event-ID``."""
    store = store_for(request, gw)
    name = await store.record_of_stream(stream_id)
    mine = name is not None and name.startswith(keys.idempotency_key(scope_of(identity), ""))
    record = await store.get(name) if mine and name is not None else None
    if name is None or record is None or record.rid != stream_id or not record.meta.stream:
        raise _not_found(f"No resumable stream '{stream_id}' (a stream is resumable when it was started with an "
                         "Idempotency-Key, until the key expires)")
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    return await Idempotent(request, gw, store, name, record.fp, last_event_id).stream_of(record)

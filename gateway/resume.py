"""Resumable OpenAI streams: positioned SSE events, and a request's events read back from Redis.

Every event of an OpenAI stream carries ``id: <request_id>:<position>``. Positions grow through the
stream and are a function of the job's events alone, so any gateway renders the same ids: the
chat stream's opening role chunk is 0, a chunk made from the worker's event ``seq`` is ``seq + 1``,
and what follows the last token (the usage chunk, an error, ``[DONE]``) counts on from there. A
client that reconnects with ``Last-Event-ID: <request_id>:<p>`` gets the events after position ``p``
(gateway/idempotency.py decides where they come from: a stored response, or ``logged_events``).

``logged_events`` reads a job's events from any gateway, in ``seq`` order, without gaps or
duplicates: it subscribes to the events channel of the gateway that queued the job, waits for the
subscription to be confirmed, then reads the job's event log (``spindle:progress:<id>``, which the
worker appends in the same script that publishes), and feeds both into a ``Subscription``, which
drops what it already has by ``seq``. An event is in the log, or published after the subscription
began, or both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import sse
from gateway.dispatcher import MAX_BUFFERED, Subscription
from gateway.errors import bad_request, timeout_error
from gateway.generation import failed, worker_failure
from gateway.openai_format import ChunkMaker
from protocol import keys
from protocol.errors import APIError, unavailable
from protocol.messages import EventBatch, TokenEvent

LIVENESS_CHECK_S = 1.0  # how often a waiting reader checks that the request it follows still exists


@dataclass(frozen=True)
class StreamEvent:
    """One SSE event of an OpenAI stream: its position and its JSON payload (``None``: ``[DONE]``)."""

    pos: int
    payload: Any

    def encode(self, stream_id: str) -> str:
        event_id = f"{stream_id}:{self.pos}"
        return sse.done(event_id) if self.payload is None else sse.data(self.payload, event_id)


def parse_last_event_id(value: str | None, stream_id: str) -> int | None:
    """The position a client has seen up to (``None``: no ``Last-Event-ID``, the whole stream)."""
    if value is None or not value.strip():
        return None
    rid, _, pos = value.strip().rpartition(":")
    if rid != stream_id or not pos.isdigit():
        raise bad_request(f"Last-Event-ID must be an id of this stream ('{stream_id}:<n>'), not '{value[:200]}'",
                          param="Last-Event-ID", code="invalid_last_event_id")
    return int(pos)


def position(block: str) -> int:
    """The position of one stored event (its first line is ``id: <request_id>:<pos>``)."""
    first = block.split("\n", 1)[0]
    return int(first.rpartition(":")[2])


def events_after(text: str, after: int | None) -> str:
    """The events of a stored stream past position ``after`` (all of them for ``None``)."""
    if after is None:
        return text
    return "".join(f"{b}\n\n" for b in text.split("\n\n") if b and position(b) > after)


async def openai_stream(events: AsyncGenerator[TokenEvent, None], chunks: ChunkMaker,
                        prompt_tokens: int) -> AsyncGenerator[StreamEvent, None]:
    """The positioned events of an OpenAI stream (chat or text) made from a job's token events."""
    async with contextlib.aclosing(events):
        pos = 0
        if chunks.chat:
            yield StreamEvent(pos, chunks.role())
        completion_tokens = 0  # as Generation counts them
        try:
            async for ev in events:
                pos = ev.seq + 1
                completion_tokens = max(completion_tokens + len(ev.token_ids), ev.completion_tokens)
                if ev.finish_reason is not None:
                    yield StreamEvent(pos, chunks.content(ev.text, ev.logprobs, ev.finish_reason))
                elif ev.text or ev.logprobs:
                    yield StreamEvent(pos, chunks.content(ev.text, ev.logprobs))
            if chunks.include_usage:
                pos += 1
                yield StreamEvent(pos, chunks.usage(prompt_tokens, completion_tokens))
        except APIError as e:
            pos += 1
            yield StreamEvent(pos, e.body())
        yield StreamEvent(pos + 1, None)


async def encoded(events: AsyncGenerator[StreamEvent, None], stream_id: str,
                  after: int | None = None) -> AsyncGenerator[str, None]:
    """SSE text of the events past position ``after``."""
    async with contextlib.aclosing(events):
        async for ev in events:
            if after is None or ev.pos > after:
                yield ev.encode(stream_id)


class Tape:
    """What a resumable stream has rendered so far. A task of its own writes it, so the job goes on
    when the client that started it goes away; that client's response follows it."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._ended = False
        self._wake = asyncio.Event()

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._wake.set()

    def end(self) -> None:
        self._ended = True
        self._wake.set()

    def text(self) -> str:
        return "".join(self._parts)

    async def follow(self) -> AsyncIterator[str]:
        """Everything written, as it is written, until the end (one reader)."""
        seen = 0
        while True:
            if seen < len(self._parts):
                chunk = "".join(self._parts[seen:])
                seen = len(self._parts)
                yield chunk
            elif self._ended:
                return
            else:
                self._wake.clear()
                await self._wake.wait()


def _connection_lost(e: Exception) -> APIError:
    return unavailable(f"Lost the connection to Redis while reading the stream ({type(e).__name__}); "
                       "resume it with Last-Event-ID", retry_after=2, code="redis_unavailable")


async def _pump(pubsub: aioredis.client.PubSub, sub: Subscription) -> None:
    """Feed ``sub`` the events for its request published on the subscribed channel."""
    needle = sub.request_id.encode()
    try:
        while not sub.finished:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg["type"] != "message" or needle not in msg["data"]:
                continue
            try:
                batch = EventBatch.decode(msg["data"])
            except ValueError:
                continue  # the request's own gateway reports this one
            for ev in batch.events:
                if ev.request_id == sub.request_id:
                    sub.feed(ev)
    except (RedisError, OSError) as e:
        sub.fail(_connection_lost(e))


async def logged_events(redis: aioredis.Redis, redis_url: str, request_id: str, gateway_id: str, deadline: float,
                        event_timeout: float, alive: Callable[[], Awaitable[bool]]) -> AsyncGenerator[TokenEvent, None]:
    """A job's token events from Redis until its final one (see the module's docstring).

    Bounded like ``Generation.events``: the whole job by ``deadline`` (unix time), each gap between
    events, once one came, by ``event_timeout``. While nothing arrives, ``alive()`` is asked every
    ``LIVENESS_CHECK_S`` whether the request is still there (its gateway gave it up when it failed
    before finishing); when not, the iteration ends with a 503.
    """
    client = aioredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), socket_timeout=5,
                                     socket_connect_timeout=2, health_check_interval=5)
    pubsub = client.pubsub()
    pump: asyncio.Task | None = None
    try:
        try:
            await pubsub.subscribe(keys.events_channel(gateway_id))
            while (msg := await pubsub.get_message(timeout=5.0)) is not None and msg["type"] != "subscribe":
                pass
            if msg is None:
                raise TimeoutError("no confirmation of the subscription")
            log = await redis.lrange(keys.progress_key(request_id), 0, -1)
        except (RedisError, OSError) as e:
            raise _connection_lost(e) from None
        # Room for the whole log: merging buffered events would change the chunks rendered.
        sub = Subscription(request_id, max_buffered=len(log) + MAX_BUFFERED)
        for raw in log:
            sub.feed(TokenEvent.model_validate_json(raw))
        if not sub.finished:
            pump = asyncio.create_task(_pump(pubsub, sub), name=f"resume-{request_id}")
        last_event = None
        while True:
            try:
                ev = await sub.get(min(max(deadline - time.time(), 0.0), LIVENESS_CHECK_S))
            except TimeoutError:
                if time.time() >= deadline:
                    raise timeout_error("The request did not complete before its deadline") from None
                if last_event is not None and time.monotonic() - last_event > event_timeout:
                    raise timeout_error(f"No tokens from the worker for {event_timeout:g}s") from None
                try:
                    if not await alive():
                        raise unavailable("The request ended on its gateway before it finished; retry it",
                                          retry_after=1, code="request_abandoned") from None
                except (RedisError, OSError) as e:
                    raise _connection_lost(e) from None
                continue
            last_event = time.monotonic()
            if failed(ev):
                raise worker_failure(ev)
            yield ev
            if ev.finish_reason is not None:
                return
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        with contextlib.suppress(Exception):
            await pubsub.aclose()
        with contextlib.suppress(Exception):
            await client.aclose()


async def log_is_complete(redis: aioredis.Redis, request_id: str) -> bool:
    """The job's event log is still kept and ends with its final event."""
    last = await redis.lindex(keys.progress_key(request_id), -1)
    return last is not None and TokenEvent.model_validate_json(last).finish_reason is not None

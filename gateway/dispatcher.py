"""One pub/sub subscription per gateway, fanned out to one bounded buffer per request.

Workers publish ``EventBatch`` messages on ``keys.events_channel(gateway_id)``. The dispatcher reads
them on one connection and hands each ``TokenEvent`` to its request's ``Subscription``, which puts
events in ``seq`` order: a duplicate (``seq`` below the next expected, e.g. re-sent after a worker
takeover) is dropped, an early one is held until the gap fills (at most ``MAX_OUT_OF_ORDER`` of them;
beyond that the request fails). A request is registered *before* its job is queued, and only while
the subscription is live, so no event can arrive before its listener.

Bounds: a request's buffer holds at most ``MAX_BUFFERED`` events; past that, new events are merged
into the last buffered one (text and token ids concatenated), so a slow reader costs memory
proportional to its own output (at most ``max_tokens``) and never blocks the other requests.

Redis going away: pub/sub does not replay what was published while we were disconnected, so every
request in flight fails at once with a 503, the dispatcher reconnects with exponential backoff and
jitter, and new requests get a 503 until it is subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from protocol import keys
from protocol.errors import APIError, unavailable
from protocol.messages import EventBatch, TokenEvent

log = logging.getLogger("gateway.dispatcher")

MAX_BUFFERED = 1024
MAX_OUT_OF_ORDER = 4096
MAX_IN_FLIGHT = 16_384
RECONNECT_MAX_DELAY = 1.0  # seconds between attempts to resubscribe, at most (before jitter)


def merge(into: TokenEvent, ev: TokenEvent) -> None:
    """Fold ``ev`` into the earlier, still unread ``into`` (same request, consecutive seq)."""
    into.seq = ev.seq
    into.token_ids = [*into.token_ids, *ev.token_ids]
    into.text += ev.text
    into.completion_tokens = max(into.completion_tokens, ev.completion_tokens)
    into.prompt_tokens = into.prompt_tokens or ev.prompt_tokens
    into.finish_reason = ev.finish_reason
    into.stop_reason = ev.stop_reason
    into.error = ev.error
    if ev.logprobs is not None:
        into.logprobs = [*(into.logprobs or []), *ev.logprobs]


class Subscription:
    """The events of one request, in ``seq`` order, for one reader."""

    def __init__(self, request_id: str, max_buffered: int = MAX_BUFFERED,
                 max_out_of_order: int = MAX_OUT_OF_ORDER):
        self.request_id = request_id
        self.max_buffered = max_buffered
        self.max_out_of_order = max_out_of_order
        self.expected = 0  # next seq to deliver
        self.duplicates = 0
        self.finished = False  # the final event has been buffered
        self.failure: APIError | None = None
        self._ready: deque[TokenEvent] = deque()
        self._early: dict[int, TokenEvent] = {}
        self._wake = asyncio.Event()

    def feed(self, ev: TokenEvent) -> None:
        if self.finished or self.failure is not None:
            return
        if ev.seq < self.expected or ev.seq in self._early:
            self.duplicates += 1
            return
        if ev.seq > self.expected:
            if len(self._early) >= self.max_out_of_order:
                self.fail(APIError(502, f"lost events for request {self.request_id} (waiting for "
                                        f"seq {self.expected})", "server_error", None, "event_gap"))
                return
            self._early[ev.seq] = ev
            return
        self._push(ev)
        while not self.finished and self.expected in self._early:
            self._push(self._early.pop(self.expected))

    def _push(self, ev: TokenEvent) -> None:
        self.expected = ev.seq + 1
        if ev.finish_reason is not None or ev.error is not None:
            self.finished = True
            self._early.clear()
        if len(self._ready) >= self.max_buffered:
            merge(self._ready[-1], ev)
        else:
            self._ready.append(ev.model_copy())
        self._wake.set()

    def fail(self, err: APIError) -> None:
        if self.failure is None and not self.finished:
            self.failure = err
            self._wake.set()

    async def get(self, timeout: float) -> TokenEvent:
        """The next event; ``TimeoutError`` after ``timeout`` seconds; the failure if one was set."""
        while True:
            if self._ready:
                return self._ready.popleft()
            if self.failure is not None:
                raise self.failure
            self._wake.clear()
            await asyncio.wait_for(self._wake.wait(), timeout)


class Dispatcher:
    def __init__(self, redis_url: str, gateway_id: str, max_in_flight: int = MAX_IN_FLIGHT):
        self.redis_url = redis_url
        self.channel = keys.events_channel(gateway_id)
        self.max_in_flight = max_in_flight
        self.subscribed = asyncio.Event()
        self._subs: dict[str, Subscription] = {}
        self._task: asyncio.Task | None = None
        self.reconnects = 0
        self.bad_messages = 0
        self.orphan_events = 0  # events for requests no longer here (finished, cancelled)

    # -- requests -------------------------------------------------------------------------------
    def register(self, request_id: str) -> Subscription:
        if not self.subscribed.is_set():
            raise unavailable("The gateway is not connected to Redis; try again shortly",
                              retry_after=2, code="redis_unavailable")
        if len(self._subs) >= self.max_in_flight:
            raise APIError(429, "Too many requests in flight on this gateway", "server_overloaded", None,
                           "gateway_full", headers={"Retry-After": "1"})
        if request_id in self._subs:
            raise APIError(409, f"request id {request_id} is already in flight", code="duplicate_request")
        sub = Subscription(request_id)
        self._subs[request_id] = sub
        return sub

    def unregister(self, request_id: str) -> None:
        self._subs.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._subs)

    def dispatch(self, raw: bytes | str) -> None:
        try:
            batch = EventBatch.decode(raw)
        except ValueError:
            self._dispatch_salvaged(raw)
            return
        for ev in batch.events:
            sub = self._subs.get(ev.request_id)
            if sub is None:
                self.orphan_events += 1
            else:
                sub.feed(ev)

    def _dispatch_salvaged(self, raw: bytes | str) -> None:
        """A batch that does not validate: deliver its valid events, fail the requests of the others."""
        self.bad_messages += 1
        try:
            items = json.loads(raw)["events"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            log.warning("dropping an undecodable event batch")
            return
        for item in items:
            try:
                ev = TokenEvent.model_validate(item)
            except ValueError as e:
                rid = item.get("request_id") if isinstance(item, dict) else None
                sub = self._subs.get(rid) if isinstance(rid, str) else None
                log.warning("malformed event for request %s: %s", rid, e)
                if sub is not None:
                    sub.fail(APIError(502, "The worker sent a malformed event", "server_error", None,
                                      "malformed_event"))
                continue
            sub = self._subs.get(ev.request_id)
            if sub is not None:
                sub.feed(ev)

    def _fail_all(self, reason: str) -> None:
        self.fail_all(unavailable(f"Lost the connection to Redis while the request was in flight ({reason})",
                                  retry_after=2, code="redis_unavailable"))

    def fail_all(self, err: APIError) -> None:
        """End every request in flight with ``err`` (their readers raise it, then close)."""
        for sub in self._subs.values():
            sub.fail(err)

    # -- the subscription loop ------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> None:
        """Start the loop and wait (up to ``timeout``) for the first subscription."""
        self._task = asyncio.create_task(self._run(), name="event-dispatcher")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all("gateway shutting down")

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("event subscription lost (%s); reconnecting in %.1fs", e, delay)
            except Exception:  # a bug must not end event delivery for good
                log.exception("event dispatcher failed; restarting in %.1fs", delay)
            finally:
                if self.subscribed.is_set():
                    self.reconnects += 1
                    delay = 0.1  # it was working: retry soon, as after a first failure
                self.subscribed.clear()
                self._fail_all("subscription lost")
            await asyncio.sleep(delay * (0.5 + random.random()))
            # Capped at 1 s (1.5 s with jitter): one SUBSCRIBE attempt a second is cheap, and the
            # promise is that service resumes within 5 s of Redis coming back.
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _listen(self) -> None:
        # No retries inside redis-py: a silent reconnect would hide lost events from us.
        client = aioredis.Redis.from_url(self.redis_url, retry=Retry(NoBackoff(), 0), socket_timeout=5,
                                         socket_connect_timeout=2, health_check_interval=5)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # Wait for the server's confirmation: only then is a PUBLISH guaranteed to reach us.
            while True:
                msg = await pubsub.get_message(timeout=5.0)
                if msg is None:
                    raise TimeoutError(f"no confirmation of SUBSCRIBE {self.channel}")
                if msg["type"] == "subscribe":
                    break
            self.subscribed.set()
            log.info("subscribed to %s", self.channel)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and msg["type"] == "message":
                    self.dispatch(msg["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

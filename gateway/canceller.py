"""Cancels jobs whose client went away, timed out or otherwise stopped listening.

``cancel(request_id)`` is synchronous and never blocks, so it is safe in a ``finally`` of a
generator that is being torn down by a disconnect. A background task takes the ids in batches and,
in one round trip, sets ``keys.cancelled_key(id)`` (with a TTL, for a job not yet picked up) for each
and publishes one ``CancelMessage`` on ``keys.CANCEL_CHANNEL`` (for jobs already running).

Bounds: at most ``max_pending`` ids wait; past that an id is dropped (and counted) -- its job still
ends at its deadline. A batch that fails to reach Redis (Redis down) is retried with backoff until
Redis is back or ``give_up_after`` seconds have passed (by then the jobs are past their deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from protocol import keys
from protocol.messages import CancelMessage

log = logging.getLogger("gateway.canceller")

BATCH = 256


class Canceller:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, max_pending: int = 10_000,
                 give_up_after: float | None = None):
        self.redis = redis
        self.ttl = max(1, int(ttl_seconds))
        self.give_up_after = self.ttl if give_up_after is None else give_up_after
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.dropped = 0

    def cancel(self, request_id: str) -> None:
        try:
            self._queue.put_nowait(request_id)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("cancel queue full; request %s ends at its deadline instead", request_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="canceller")

    async def stop(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (within ``flush_timeout``), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), flush_timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _send(self, request_ids: list[str]) -> None:
        delay = 0.1
        start = time.monotonic()
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for rid in request_ids:
                        p.set(keys.cancelled_key(rid), "1", ex=self.ttl)
                    p.publish(keys.CANCEL_CHANNEL, CancelMessage(request_ids=request_ids).model_dump_json())
                    await p.execute()
                self.sent += len(request_ids)
                return
            except RedisError as e:
                if time.monotonic() - start > self.give_up_after:
                    self.dropped += len(request_ids)
                    log.error("could not cancel %d job(s): %s", len(request_ids), e)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

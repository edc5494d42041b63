"""Which workers are alive and which models they serve, read from their heartbeat keys.

A worker's key (``keys.worker_key``) holds its ``WorkerInfo`` JSON and expires after the heartbeat
TTL, so a key that exists is a live worker. The listing (SCAN + MGET) is cached for ``cache_seconds``
so a burst of requests costs one round trip, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from protocol import keys
from protocol.messages import WorkerInfo

log = logging.getLogger("gateway.workers")


EMPTY_CACHE_SECONDS = 0.2


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, cache_seconds: float = 1.0, max_workers: int = 4096):
        self.redis = redis
        self.cache_seconds = cache_seconds
        self.max_workers = max_workers
        self._cached: list[WorkerInfo] = []
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def live(self) -> list[WorkerInfo]:
        """Every live worker (draining ones included); raises RedisError if Redis is down."""
        if self._fresh():
            return self._cached
        async with self._lock:
            if self._fresh():
                return self._cached
            names = []
            async for key in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN, count=500):
                names.append(key)
                if len(names) >= self.max_workers:
                    break
            values = await self.redis.mget(names) if names else []
            infos = []
            for name, raw in zip(names, values, strict=True):
                if raw is None:  # expired between SCAN and MGET
                    continue
                try:
                    infos.append(WorkerInfo.model_validate_json(raw))
                except ValueError:
                    log.warning("ignoring malformed worker key %r", name)
            self._cached, self._at = infos, time.monotonic()
            return infos

    def _fresh(self) -> bool:
        # "No workers" is kept only briefly: right after a Redis restart or a worker start it is the
        # answer most likely to change, and a full second of it was most of the recovery time.
        ttl = self.cache_seconds if self._cached else min(self.cache_seconds, EMPTY_CACHE_SECONDS)
        return time.monotonic() - self._at < ttl

    async def serving(self, model: str) -> list[WorkerInfo]:
        """Live workers that serve ``model`` and take new jobs (not draining)."""
        return [w for w in await self.live() if model in w.models and not w.draining]

    async def served_models(self) -> set[str]:
        return {m for w in await self.live() if not w.draining for m in w.models}

    def invalidate(self) -> None:
        self._at = float("-inf")

"""Admission: every decision whether a request gets in, in order, and the count of refusals by reason.

- Draining: once the gateway is shutting down (SIGTERM, ``gateway/__main__.py``), every new request
  gets a 503 ``shutting_down`` with ``Retry-After``; requests already admitted run on.
- Auth: when ``API_KEYS`` is set, ``Authorization: Bearer <key>`` must match one of them. Keys are
  compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so the time
  taken says nothing about how much of a key matched. Failures are 401 ``authentication_error``.
- Concurrency: at most ``MAX_CONCURRENT_REQUESTS`` requests in flight per key (per client address when
  auth is off) on this gateway; past it a 429 with ``Retry-After``.
- Rate limits: requests and tokens per minute per key, token buckets in Redis (``gateway/ratelimit.py``);
  past them a 429 ``rate_limit_exceeded`` with ``Retry-After`` and ``x-ratelimit-*`` headers.
- Queue capacity: a job is added to its model's stream only if fewer than ``QUEUE_CAPACITY`` entries
  are waiting there undelivered to any worker; the check and the XADD are one Lua script, so
  concurrent requests cannot overshoot. Past it a 429 ``server_overloaded`` with ``Retry-After``.
  "Waiting" is the consumer group's ``lag`` where Redis reports it (7.0+), else the entries after the
  group's last-delivered id (counted inside Redis, at most QUEUE_CAPACITY of them). The script also
  creates the ``workers`` group at id 0 if it is missing, so jobs queued before the first worker
  starts are not skipped by a group created at ``$``.

Redis being down fails the request at once with a 503 (the app's ``RedisError`` handler). Each refusal
is counted by ``on_reject(reason)`` (``spindle_admission_rejections_total{reason}``): ``draining``,
``auth``, ``concurrency``, ``exceeds_token_limit``, ``rate_limit_requests``, ``rate_limit_tokens``,
``queue_full``, ``redis_unavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.ratelimit import RATE_LIMIT_HEADERS, Limits, RateLimiter, key_identity, parse_key_limits
from protocol import keys
from protocol.errors import APIError, overloaded, unavailable
from protocol.messages import Job

log = logging.getLogger("gateway.admission")

ENQUEUE_LUA = """
local stream, group, cap = KEYS[1], ARGV[1], tonumber(ARGV[2])
local waiting = 0
if redis.call('EXISTS', stream) == 1 then
  local found = false
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      found = true
      if type(info['lag']) == 'number' then
        waiting = info['lag']
      else
        waiting = #redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', cap)
      end
    end
  end
  if not found then
    waiting = redis.call('XLEN', stream)
    redis.call('XGROUP', 'CREATE', stream, group, '0')
  end
else
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
end
if waiting >= cap then
  return {false, waiting}
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', stream, '*', unpack(fields))
return {id, waiting}
"""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Ticket:
    """What one admitted request holds: its concurrency slot and its rate-limit reservation."""

    def __init__(self, admission: Admission, identity: str, tokens: int, release_slot: Callable[[], None],
                 reserved: bool):
        self.admission = admission
        self.identity = identity
        self.tokens = tokens  # reserved: prompt + max_tokens
        self._release_slot = release_slot
        self._reserved = reserved
        self.released = False

    def release(self, unused_tokens: int = 0, unused_request: bool = False) -> None:
        """Free the slot and give back what the request did not use. Idempotent and synchronous (it
        runs from ``Generation.close``, maybe while the task is being cancelled): the give-back is a
        background task."""
        if self.released:
            return
        self.released = True
        self._release_slot()
        if self._reserved and (unused_tokens > 0 or unused_request):
            self.admission.refund_later(self.identity, int(unused_request), min(self.tokens, unused_tokens))

    def cancel(self) -> None:
        """The job never reached the queue: give everything back, the request included."""
        self.release(self.tokens, unused_request=True)


class Admission:
    def __init__(self, redis: aioredis.Redis, api_keys: str, max_concurrent: int, queue_capacity: int, *,
                 rate_limits: Limits | None = None, key_limits: str = "",
                 on_reject: Callable[[str], None] | None = None):
        self.redis = redis
        configured = [k.strip() for k in api_keys.split(",") if k.strip()]
        self._keys = [_digest(k) for k in configured]
        self.max_concurrent = max_concurrent
        self.queue_capacity = queue_capacity
        self.draining = False
        self._in_flight: dict[str, int] = {}
        self._enqueue = redis.register_script(ENQUEUE_LUA)
        per_key = parse_key_limits(key_limits)
        unknown = set(per_key) - {key_identity(k) for k in configured}
        if unknown:
            raise ValueError(f"API_KEY_LIMITS names {len(unknown)} key(s) that are not in API_KEYS")
        self.limiter = RateLimiter(redis, rate_limits or Limits(), per_key)
        self._on_reject = on_reject or (lambda _reason: None)
        self._refunds: set[asyncio.Task] = set()

    @property
    def auth_enabled(self) -> bool:
        return bool(self._keys)

    @property
    def total_in_flight(self) -> int:
        """Requests admitted on this gateway and not released yet (every key together)."""
        return sum(self._in_flight.values())

    def _refuse(self, reason: str, err: APIError) -> APIError:
        self._on_reject(reason)
        return err

    def check_open(self) -> None:
        if self.draining:
            raise self._refuse("draining", unavailable("This gateway is shutting down; retry (another instance "
                                                       "will answer)", retry_after=2, code="shutting_down"))

    def authenticate(self, authorization: str | None, client: str) -> str:
        """The caller's identity (``key:<hash prefix>`` or ``ip:<address>``); 401 if not allowed, 503
        while draining."""
        self.check_open()
        if not self._keys:
            return f"ip:{client}"
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse("auth", APIError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                                                "authentication_error", None, "missing_api_key",
                                                headers={"WWW-Authenticate": "Bearer"}))
        given = _digest(token.strip())
        match = None
        for k in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(given, k):
                match = k
        if match is None:
            raise self._refuse("auth", APIError(401, "Invalid API key", "authentication_error", None,
                                                "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return "key:" + match.hex()[:12]

    def acquire(self, identity: str) -> Callable[[], None]:
        """Take one in-flight slot for ``identity``; returns the release function (idempotent)."""
        n = self._in_flight.get(identity, 0)
        if self.max_concurrent > 0 and n >= self.max_concurrent:
            raise self._refuse("concurrency", APIError(
                429, f"Too many concurrent requests for this key (limit {self.max_concurrent})",
                "server_overloaded", None, "concurrency_limit", headers={"Retry-After": "1"}))
        self._in_flight[identity] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._in_flight.get(identity, 1) - 1
            if left > 0:
                self._in_flight[identity] = left
            else:
                self._in_flight.pop(identity, None)

        return release

    def in_flight(self, identity: str) -> int:
        return self._in_flight.get(identity, 0)

    async def admit(self, identity: str, tokens: int) -> Ticket:
        """A concurrency slot and one request plus ``tokens`` from the caller's rate limits, or a 429
        (503 while draining or without Redis). The ``x-ratelimit-*`` headers go to the response."""
        self.check_open()
        release = self.acquire(identity)
        try:
            quota = await self.limiter.take(identity, tokens)
        except APIError:  # more tokens than the bucket holds
            release()
            self._on_reject("exceeds_token_limit")
            raise
        except (RedisError, OSError):
            release()
            self._on_reject("redis_unavailable")
            raise
        except BaseException:
            release()
            raise
        if quota is not None:
            if not quota.taken:
                release()
                raise self._refuse(f"rate_limit_{quota.exceeded}", quota.error(tokens))
            recorded = RATE_LIMIT_HEADERS.get()
            if recorded is not None:
                recorded.update(quota.headers())
        return Ticket(self, identity, tokens, release, reserved=quota is not None)

    def refund_later(self, identity: str, requests: int, tokens: int) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self.limiter.refund(identity, requests, tokens))
        except RuntimeError:  # no loop (the app is gone): the bucket refills by itself
            return
        self._refunds.add(task)
        task.add_done_callback(self._refund_done)

    def _refund_done(self, task: asyncio.Task) -> None:
        self._refunds.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("rate-limit refund failed: %s", task.exception())

    async def enqueue(self, job: Job) -> str:
        """XADD the job to its model's stream unless the queue is full (429). Returns the entry id."""
        fields = job.to_fields()
        args: list[str | int] = [keys.JOBS_GROUP, self.queue_capacity]
        for k, v in fields.items():
            args += [k, v]
        try:
            entry_id, waiting = await self._enqueue(keys=[keys.jobs_stream(job.model)], args=args)
        except (RedisError, OSError):
            self._on_reject("redis_unavailable")
            raise
        if not entry_id:
            raise self._refuse("queue_full", overloaded(
                f"The queue for model '{job.model}' is full ({waiting} requests waiting, "
                f"capacity {self.queue_capacity}); retry shortly", retry_after=1))
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

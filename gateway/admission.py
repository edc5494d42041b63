"""Admission: API keys, in-flight requests per key, and the bounded job queue per model.

- Auth: when ``API_KEYS`` is set, ``Authorization: Bearer <key>`` must match one of them. Keys are
  compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so the time
  taken says nothing about how much of a key matched. Failures are 401 ``authentication_error``.
- Concurrency: at most ``MAX_CONCURRENT_REQUESTS`` requests in flight per key (per client address when
  auth is off) on this gateway; past it a 429 with ``Retry-After``.
- Queue capacity: a job is added to its model's stream only if fewer than ``QUEUE_CAPACITY`` entries
  are waiting there undelivered to any worker; the check and the XADD are one Lua script, so
  concurrent requests cannot overshoot. Past it a 429 ``server_overloaded`` with ``Retry-After``.
  "Waiting" is the consumer group's ``lag`` where Redis reports it (7.0+), else the entries after the
  group's last-delivered id (counted inside Redis, at most QUEUE_CAPACITY of them). The script also
  creates the ``workers`` group at id 0 if it is missing, so jobs queued before the first worker
  starts are not skipped by a group created at ``$``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import redis.asyncio as aioredis

from protocol import keys
from protocol.errors import APIError, overloaded
from protocol.messages import Job

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


class Admission:
    def __init__(self, redis: aioredis.Redis, api_keys: str, max_concurrent: int, queue_capacity: int):
        self.redis = redis
        self._keys = [_digest(k.strip()) for k in api_keys.split(",") if k.strip()]
        self.max_concurrent = max_concurrent
        self.queue_capacity = queue_capacity
        self._in_flight: dict[str, int] = {}
        self._enqueue = redis.register_script(ENQUEUE_LUA)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None, client: str) -> str:
        """The caller's identity (``key:<hash prefix>`` or ``ip:<address>``); 401 if not allowed."""
        if not self._keys:
            return f"ip:{client}"
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        given = _digest(token.strip())
        match = None
        for k in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(given, k):
                match = k
        if match is None:
            raise APIError(401, "Invalid API key", "authentication_error", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return "key:" + match.hex()[:12]

    def acquire(self, identity: str) -> Callable[[], None]:
        """Take one in-flight slot for ``identity``; returns the release function (idempotent)."""
        n = self._in_flight.get(identity, 0)
        if self.max_concurrent > 0 and n >= self.max_concurrent:
            raise APIError(429, f"Too many concurrent requests for this key (limit {self.max_concurrent})",
                           "server_overloaded", None, "concurrency_limit", headers={"Retry-After": "1"})
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

    async def enqueue(self, job: Job) -> str:
        """XADD the job to its model's stream unless the queue is full (429). Returns the entry id."""
        fields = job.to_fields()
        args: list[str | int] = [keys.JOBS_GROUP, self.queue_capacity]
        for k, v in fields.items():
            args += [k, v]
        entry_id, waiting = await self._enqueue(keys=[keys.jobs_stream(job.model)], args=args)
        if not entry_id:
            raise overloaded(f"The queue for model '{job.model}' is full ({waiting} requests waiting, "
                             f"capacity {self.queue_capacity}); retry shortly", retry_after=1)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

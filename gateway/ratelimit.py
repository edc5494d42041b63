"""Per-key rate limits: requests per minute and tokens per minute, as token buckets in Redis.

Each identity (API key, or client address when auth is off) has one hash in Redis holding two
buckets: ``r`` (requests, capacity ``RATE_LIMIT_RPM``) and ``t`` (tokens, capacity ``RATE_LIMIT_TPM``),
and the time they were last updated. Both refill continuously, a full bucket per minute. One Lua
script refills them by the time elapsed (Redis' own clock, ``TIME``, so gateways with skewed clocks
agree) and takes one request and the request's tokens from both, or from neither. Every gateway
shares the buckets, so a limit holds across the fleet.

A request's tokens are its prompt plus its ``max_tokens``, reserved at admission; when the request
ends, what it did not generate is given back (``refund``). 0 means unlimited; with both limits 0,
Redis is never asked. ``API_KEY_LIMITS`` (``key:rpm:tpm,...``) overrides the limits for single keys.

Past a limit the answer is an immediate 429 (``code: rate_limit_exceeded``, ``type: requests`` or
``tokens`` as OpenAI sends) with ``Retry-After``: the seconds until enough has refilled. Every answer
to an admitted or refused request carries OpenAI's ``x-ratelimit-*`` headers (``RATE_LIMIT_HEADERS``
collects them; ``RateLimitHeadersMiddleware`` adds them to the response). A request that needs more
tokens than the whole bucket holds could never pass: it is a 400, not a 429 a client would retry.
"""

from __future__ import annotations

import hashlib
import math
from contextvars import ContextVar
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol import keys
from protocol.errors import APIError

WINDOW_MS = 60_000

# KEYS[1]: the identity's hash. ARGV: rpm, tpm, requests to take, tokens to take (negative: give back).
# Returns {taken (0/1), requests left, tokens left, ms until the requests fit, ms until the tokens fit,
#          ms until the requests bucket is full, ms until the tokens bucket is full}.
RATE_LIMIT_LUA = """
redis.replicate_commands()
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local want_r, want_t = tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local saved = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local elapsed = math.max(0, now - (tonumber(saved[3]) or now))
local function refill(level, limit)
  if limit <= 0 then return 0 end
  level = tonumber(level)
  if level == nil then return limit end
  return math.min(limit, level + elapsed * limit / 60000)
end
local function wait(level, want, limit)
  if limit <= 0 or want <= level then return 0 end
  return math.ceil((want - level) * 60000 / limit)
end
local function until_full(level, limit)
  if limit <= 0 then return 0 end
  return math.ceil((limit - level) * 60000 / limit)
end
local r, t = refill(saved[1], rpm), refill(saved[2], tpm)
local wait_r, wait_t = wait(r, want_r, rpm), wait(t, want_t, tpm)
local taken = 0
if wait_r == 0 and wait_t == 0 then
  taken = 1
  if rpm > 0 then r = math.min(rpm, r - want_r) end
  if tpm > 0 then t = math.min(tpm, t - want_t) end
end
redis.call('HSET', KEYS[1], 'r', r, 't', t, 'ts', now)
redis.call('PEXPIRE', KEYS[1], 61000)
return {taken, math.floor(r), math.floor(t), wait_r, wait_t, until_full(r, rpm), until_full(t, tpm)}
"""

# Filled by ``Admission.admit`` for the request being served; added to its response by the middleware.
RATE_LIMIT_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("rate_limit_headers", default=None)


@dataclass(frozen=True)
class Limits:
    rpm: int = 0
    tpm: int = 0

    @property
    def unlimited(self) -> bool:
        return self.rpm <= 0 and self.tpm <= 0


def key_identity(api_key: str) -> str:
    """The identity ``Admission.authenticate`` gives a caller with this key (never the key itself)."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def parse_key_limits(spec: str) -> dict[str, Limits]:
    """``API_KEY_LIMITS``: ``key:rpm:tpm`` entries, comma-separated -> {identity: Limits}."""
    out: dict[str, Limits] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        key, _, rest = entry.rpartition(":")
        key, _, rpm = key.rpartition(":")
        try:
            limits = Limits(int(rpm), int(rest))
        except ValueError:
            limits = None
        if not key or limits is None:
            raise ValueError("API_KEY_LIMITS entries are key:rpm:tpm (integers), comma-separated")
        out[key_identity(key)] = limits
    return out


def go_duration(ms: int) -> str:
    """``1m30s``, ``2.5s``, ``20ms``: the format of OpenAI's ``x-ratelimit-reset-*`` headers."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{seconds}" if minutes else seconds


@dataclass(frozen=True)
class Quota:
    """One take's outcome."""

    limits: Limits
    taken: bool
    remaining_requests: int
    remaining_tokens: int
    wait_requests_ms: int
    wait_tokens_ms: int
    reset_requests_ms: int
    reset_tokens_ms: int

    @property
    def exceeded(self) -> str:
        """``requests`` or ``tokens``: the limit that keeps the request waiting longest."""
        return "requests" if self.wait_requests_ms >= self.wait_tokens_ms else "tokens"

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(max(self.wait_requests_ms, self.wait_tokens_ms) / 1000))

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.limits.rpm > 0:
            out.update({"x-ratelimit-limit-requests": str(self.limits.rpm),
                        "x-ratelimit-remaining-requests": str(self.remaining_requests),
                        "x-ratelimit-reset-requests": go_duration(self.reset_requests_ms)})
        if self.limits.tpm > 0:
            out.update({"x-ratelimit-limit-tokens": str(self.limits.tpm),
                        "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
                        "x-ratelimit-reset-tokens": go_duration(self.reset_tokens_ms)})
        return out

    def error(self, tokens: int) -> APIError:
        kind = self.exceeded
        limit = self.limits.rpm if kind == "requests" else self.limits.tpm
        short = "RPM" if kind == "requests" else "TPM"
        asked = f", requested {tokens}" if kind == "tokens" else ""
        return APIError(429, f"Rate limit reached on {kind} per min ({short}): limit {limit}{asked}. "
                             f"Please try again in {self.retry_after}s.", kind, None, "rate_limit_exceeded",
                        headers={"Retry-After": str(self.retry_after), **self.headers()})


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, default: Limits, per_identity: dict[str, Limits] | None = None):
        self.default = default
        self.per_identity = per_identity or {}
        self._script = redis.register_script(RATE_LIMIT_LUA)

    def limits_for(self, identity: str) -> Limits:
        return self.per_identity.get(identity, self.default)

    async def take(self, identity: str, tokens: int) -> Quota | None:
        """Take one request and ``tokens`` from ``identity``'s buckets, or nothing (``taken`` false).
        None when it has no limits. A request larger than the token bucket is a 400."""
        limits = self.limits_for(identity)
        if limits.unlimited:
            return None
        if 0 < limits.tpm < tokens:
            raise APIError(400, f"Request too large: it reserves {tokens} tokens (prompt plus max_tokens), "
                                f"more than this key's limit of {limits.tpm} tokens per minute. Reduce the "
                                f"prompt or max_tokens.", "invalid_request_error", "max_tokens", "exceeds_token_limit")
        return await self._run(identity, limits, 1, tokens)

    async def refund(self, identity: str, requests: int, tokens: int) -> None:
        """Give back what a request reserved and did not use (never beyond a full bucket)."""
        limits = self.limits_for(identity)
        if not limits.unlimited and (requests > 0 or tokens > 0):
            await self._run(identity, limits, -requests, -tokens)

    async def _run(self, identity: str, limits: Limits, requests: int, tokens: int) -> Quota:
        out = await self._script(keys=[keys.rate_limit_key(identity)],
                                 args=[limits.rpm, limits.tpm, requests, tokens])
        taken, left_r, left_t, wait_r, wait_t, full_r, full_t = (int(v) for v in out)
        return Quota(limits, bool(taken), left_r, left_t, wait_r, wait_t, full_r, full_t)


class RateLimitHeadersMiddleware:
    """Adds the ``x-ratelimit-*`` headers that admission recorded for this request to its response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded: dict[str, str] = {}
        token = RATE_LIMIT_HEADERS.set(recorded)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and recorded:
                headers = MutableHeaders(scope=message)
                for name, value in recorded.items():
                    if name not in headers:
                        headers.append(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            RATE_LIMIT_HEADERS.reset(token)

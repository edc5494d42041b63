"""One job in flight: its events in order, its deadlines, its metrics, and its cancellation.

``Generation.events()`` yields the job's ``TokenEvent`` until the final one. Every wait is bounded:
the whole request by ``REQUEST_TIMEOUT`` (counted from arrival), and, once a worker has started it,
each gap between events by ``EVENT_TIMEOUT``. A worker that reports an error, a timeout or a
cancellation ends the iteration with an ``APIError``. ``close()`` (always called, from a ``finally``)
frees the request's buffer and concurrency slot and, unless the job finished, cancels it -- so a
client that disconnects, a timeout, or any error on our side stops the worker's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from gateway.dispatcher import Subscription
from gateway.errors import timeout_error
from protocol import tracing
from protocol.errors import APIError, unavailable
from protocol.messages import Job, TokenEvent, TokenLogprob

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("gateway.generation")
T = TypeVar("T")


@dataclass
class Outcome:
    """Everything a non-streaming response needs."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None
    ttft: float | None
    elapsed: float
    extra: dict[str, Any] = field(default_factory=dict)


class Generation:
    def __init__(self, gw: Gateway, job: Job, sub: Subscription, release: Callable[[], None], arrival: float,
                 client_request_id: str = ""):
        self.gw = gw
        self.job = job
        self.sub = sub
        self._release = release
        self.arrival = arrival
        self.client_request_id = client_request_id
        self.first_event_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.cancel_reason = "client_gone"
        self.done = False  # the job ended on the worker side (finished or failed there)
        self.closed = False
        self.span = tracing.current_span()  # the request's span (None when tracing is off)

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def model(self) -> str:
        return self.job.model

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt_token_ids)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.arrival

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # -- events ---------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TokenEvent]:
        s = self.gw.settings
        deadline = self.arrival + s.request_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(f"The request did not complete within {s.request_timeout:g}s")
            idle = self.first_event_at is not None and s.event_timeout < left
            try:
                ev = await self.sub.get(s.event_timeout if idle else left)
            except TimeoutError:
                if idle:
                    raise self._timed_out(f"No tokens from the worker for {s.event_timeout:g}s") from None
                raise self._timed_out(f"The request did not complete within {s.request_timeout:g}s") from None
            except APIError as e:
                # The dispatcher failed this request: Redis was lost, or the gateway's drain ran out.
                self.cancel_reason = "shutting_down" if e.code == "shutting_down" else "redis_lost"
                raise
            self._observe(ev)
            if failed(ev):
                raise self._worker_failure(ev)
            yield ev
            if ev.finish_reason is not None:
                self._finished(ev)
                return

    def _observe(self, ev: TokenEvent) -> None:
        now = time.monotonic()
        m = self.gw.metrics
        if self.first_event_at is None:
            self.first_event_at = now
            if ev.queue_time is not None:
                m.queue_time.labels(self.model).observe(ev.queue_time)
        if self.first_token_at is None and (ev.token_ids or ev.text):
            self.first_token_at = now
            m.ttft.labels(self.model).observe(now - self.arrival)
            if self.span is not None:
                self.span.add_event("first_token", {"spindle.worker_id": ev.worker_id})
        self.completion_tokens = max(self.completion_tokens + len(ev.token_ids), ev.completion_tokens)

    def _finished(self, ev: TokenEvent) -> None:
        self.done = True
        self.finished_at = time.monotonic()
        self.finish_reason = ev.finish_reason
        self.stop_reason = ev.stop_reason
        m = self.gw.metrics
        m.e2e.labels(self.model).observe(self.finished_at - self.arrival)
        m.success.labels(self.model, ev.finish_reason).inc()
        m.generation_tokens_hist.labels(self.model).observe(self.completion_tokens)
        if self.span is not None:
            self.span.set_attributes({"gen_ai.request.model": self.model, "spindle.finish_reason": ev.finish_reason,
                                      "gen_ai.usage.input_tokens": self.prompt_tokens,
                                      "gen_ai.usage.output_tokens": self.completion_tokens})

    def _timed_out(self, message: str) -> APIError:
        self.cancel_reason = "timeout"
        self.gw.metrics.engine_errors.labels("timeout").inc()
        return timeout_error(message)

    def _worker_failure(self, ev: TokenEvent) -> APIError:
        self.done = True
        self.gw.metrics.engine_errors.labels(ev.finish_reason or "error").inc()
        return worker_failure(ev)

    async def collect(self) -> Outcome:
        parts: list[str] = []
        ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        async for ev in self.events():
            parts.append(ev.text)
            ids.extend(ev.token_ids)
            if ev.logprobs:
                logprobs.extend(ev.logprobs)
        return Outcome("".join(parts), ids, self.finish_reason or "stop", self.stop_reason, self.prompt_tokens,
                       self.completion_tokens, logprobs if self.job.params.logprobs is not None else None,
                       self.ttft, self.elapsed())

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Idempotent, synchronous (safe while the task is being cancelled)."""
        if self.closed:
            return
        self.closed = True
        self.gw.dispatcher.unregister(self.request_id)
        self._release()
        m = self.gw.metrics
        m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.model).inc(self.completion_tokens)
        if not self.done:
            self.gw.canceller.cancel(self.request_id)
            m.cancellations.labels(self.cancel_reason).inc()
        log.info("request %s %s: %s, %d+%d tokens, %.3fs", self.request_id, self.model,
                 self.finish_reason or f"ended ({self.cancel_reason})", self.prompt_tokens,
                 self.completion_tokens, self.elapsed(),
                 extra={"request_id": self.client_request_id or self.request_id, "model": self.model,
                        "trace_id": tracing.trace_id_of(self.job.trace)})


def failed(ev: TokenEvent) -> bool:
    """The event ends its request with a failure on the worker's side."""
    return ev.error is not None or ev.finish_reason in ("error", "timeout", "cancelled")


def worker_failure(ev: TokenEvent) -> APIError:
    """The client's error for a failed final event (``failed(ev)``)."""
    kind = ev.finish_reason or "error"
    if kind == "timeout":
        return timeout_error(ev.error or "The request's deadline passed before it completed")
    if kind == "cancelled":
        return unavailable(ev.error or "The request was cancelled by the server; retry it",
                           retry_after=1, code="cancelled")
    return APIError(500, f"Generation failed on the worker: {ev.error or 'unknown error'}",
                    "server_error", None, "engine_error")


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the server sends ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, but give up (499) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "The client closed the connection", "invalid_request_error", None, "client_closed")
    return task.result()

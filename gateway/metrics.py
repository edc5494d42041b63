"""Prometheus metrics of the gateway (one registry per app), and the middleware that times requests.

Names follow vLLM where vLLM has one (``vllm:time_to_first_token_seconds`` ...), labelled by
``model_name``, so existing dashboards work; plus the seed's ``llm_*`` names. ``endpoint`` labels are
route templates (``/v1/models/{model_id}``), never raw paths; a request that matched no route is
``endpoint="unmatched"``. ``llm_request_duration_seconds`` is measured until the last byte of the
response (the end of the stream), not the first.

What lives in Redis rather than in this process is sampled by ``RedisSampler``, a background task of
the app's lifespan, every ``QUEUE_METRICS_INTERVAL`` seconds (a scrape never waits on Redis):
``spindle_queue_depth{model_name}`` (jobs no worker has taken yet: the stream's length minus its
pending entries, since workers delete the jobs they finish), ``spindle_queue_in_flight{model_name}``
(taken, not finished), ``spindle_workers_live`` (live heartbeats, draining ones included),
``spindle_workers{model_name}`` (live workers taking that model's jobs) and ``spindle_redis_up``;
with ``spindle_queue_capacity`` (``QUEUE_CAPACITY``) beside them, so alerts can use the fraction.

``MetricsMiddleware`` also opens the request's trace span when tracing is on (``protocol.tracing``):
it continues a client's ``traceparent`` if one is sent, and ``Gateway.submit`` puts its context into
the job, so the worker's spans join the same trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.workers import WorkerRegistry
from protocol import keys, tracing

log = logging.getLogger("gateway.metrics")

UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_requests", "HTTP requests by route template and status code",
                                ["endpoint", "status"], registry=r)
        self.in_progress = Gauge("llm_requests_in_progress", "HTTP requests being served", registry=r)
        self.duration = Histogram("llm_request_duration_seconds",
                                  "HTTP request duration, to the end of the response stream",
                                  ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time from request arrival to the first generated token", ["model_name"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Time from request arrival to the last token", ["model_name"],
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Time a job waited in the queue before a worker took it",
                                    ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of submitted requests",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens delivered",
                                         ["model_name"], registry=r)
        self.success = Counter("vllm:request_success", "Requests that finished generating",
                               ["model_name", "finished_reason"], registry=r)
        self.generation_tokens_hist = Histogram("llm_generation_tokens", "Generated tokens per request",
                                                ["model_name"], buckets=TOKEN_BUCKETS, registry=r)
        self.engine_errors = Counter("llm_engine_errors", "Requests that failed after being queued",
                                     ["error_type"], registry=r)
        self.rejections = Counter("spindle_admission_rejections",
                                  "Requests refused by admission, by reason (gateway/admission.py)",
                                  ["reason"], registry=r)
        self.cancellations = Counter("spindle_gateway_cancellations",
                                     "Jobs cancelled by the gateway (client gone, timeout, error)",
                                     ["reason"], registry=r)
        # Sampled from Redis by RedisSampler.
        self.queue_depth = Gauge("spindle_queue_depth", "Jobs queued that no worker has taken yet",
                                 ["model_name"], registry=r)
        self.queue_in_flight = Gauge("spindle_queue_in_flight", "Jobs taken by a worker and not finished",
                                     ["model_name"], registry=r)
        self.workers_live = Gauge("spindle_workers_live", "Workers with a live heartbeat (draining included)",
                                  registry=r)
        self.workers = Gauge("spindle_workers", "Live workers taking a model's jobs (not draining)",
                             ["model_name"], registry=r)
        self.redis_up = Gauge("spindle_redis_up", "1 when the gateway's last Redis sample succeeded",
                              registry=r)
        self.queue_capacity = Gauge("spindle_queue_capacity", "QUEUE_CAPACITY: queued jobs per model before 429s",
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request, streaming responses included, by route template."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span = start_request_span(scope)
        self.metrics.in_progress.inc()
        try:
            if span is None:
                await self.app(scope, receive, send_and_record)
            else:
                from opentelemetry.trace import use_span

                with use_span(span, end_on_exit=False):
                    await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_progress.dec()
            endpoint = route_template(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)
            if span is not None:
                end_request_span(span, scope, endpoint, status)


def start_request_span(scope: Scope) -> Any:
    """The request's server span (continuing a client's ``traceparent``); None when tracing is off and for
    the probes (``UNTRACED_PATHS``), which would bury the requests' traces under their own."""
    tracer = tracing.tracer("spindle.gateway")
    if tracer is None or scope["path"] in UNTRACED_PATHS:
        return None
    from opentelemetry.trace import SpanKind

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
               if k.lower() in (b"traceparent", b"tracestate")}
    return tracer.start_span(scope["method"], context=tracing.extract(headers), kind=SpanKind.SERVER,
                             attributes={"http.request.method": scope["method"], "url.path": scope["path"]})


def end_request_span(span: Any, scope: Scope, endpoint: str, status: int) -> None:
    span.update_name(f"{scope['method']} {endpoint}")
    span.set_attributes({"http.route": endpoint, "http.response.status_code": status,
                         "spindle.request_id": scope.get("spindle.request_id", "")})
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))
    span.end()


class RedisSampler:
    """Samples queue depth, live workers and Redis' health into gauges every ``interval`` seconds."""

    def __init__(self, metrics: GatewayMetrics, redis: aioredis.Redis, interval: float, queue_capacity: int,
                 max_streams: int = 256):
        self.metrics = metrics
        metrics.queue_capacity.set(queue_capacity)
        self.redis = redis
        # Its own registry, uncached: sharing the request path's cache would let a sample taken just
        # before a worker's first heartbeat answer requests with "no live worker".
        self.workers = WorkerRegistry(redis, cache_seconds=0)
        self.interval = interval
        self.max_streams = max_streams
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="metrics-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.sample(), timeout=max(self.interval, 5.0))
            except (RedisError, OSError, TimeoutError) as e:
                self.metrics.redis_up.set(0)
                log.debug("metrics sample failed: %s", e)
            except Exception:
                log.exception("metrics sample failed")
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """One sample; raises RedisError when Redis is down (then the gauges keep their last values)."""
        live = await self.workers.live()
        prefix = keys.jobs_stream("")
        streams: list[str] = []
        async for key in self.redis.scan_iter(match=keys.jobs_stream("*"), count=500, _type="STREAM"):
            streams.append(key.decode() if isinstance(key, bytes) else key)
            if len(streams) >= self.max_streams:
                break
        results: list[Any] = []
        if streams:
            async with self.redis.pipeline(transaction=False) as p:
                for stream in streams:
                    p.xlen(stream)
                    p.xpending(stream, keys.JOBS_GROUP)
                results = await p.execute(raise_on_error=False)
        depth: dict[str, tuple[int, int]] = {}
        for i, stream in enumerate(streams):
            length, pending = results[2 * i], results[2 * i + 1]
            if isinstance(length, Exception):
                continue
            in_flight = 0 if isinstance(pending, Exception) else int(pending.get("pending") or 0)
            depth[stream.removeprefix(prefix)] = (max(0, int(length) - in_flight), in_flight)
        serving: dict[str, int] = {}
        for w in live:
            for model in w.models:
                serving[model] = serving.get(model, 0) + (0 if w.draining else 1)
        m = self.metrics  # no await from here on: a scrape sees all of one sample or none of it
        m.queue_depth.clear()
        m.queue_in_flight.clear()
        m.workers.clear()
        for model in sorted(set(depth) | set(serving)):
            waiting, in_flight = depth.get(model, (0, 0))
            m.queue_depth.labels(model).set(waiting)
            m.queue_in_flight.labels(model).set(in_flight)
            m.workers.labels(model).set(serving.get(model, 0))
        m.workers_live.set(len(live))
        m.redis_up.set(1)

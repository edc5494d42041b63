"""Prometheus metrics of the gateway (one registry per app), and the middleware that times requests.

Names follow vLLM where vLLM has one (``vllm:time_to_first_token_seconds`` ...), labelled by
``model_name``, so existing dashboards work; plus the seed's ``llm_*`` names. ``endpoint`` labels are
route templates (``/v1/models/{model_id}``), never raw paths; a request that matched no route is
``endpoint="unmatched"``. ``llm_request_duration_seconds`` is measured until the last byte of the
response (the end of the stream), not the first.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
                                  "Requests refused by admission (auth, concurrency, queue full)",
                                  ["reason"], registry=r)
        self.cancellations = Counter("spindle_gateway_cancellations",
                                     "Jobs cancelled by the gateway (client gone, timeout, error)",
                                     ["reason"], registry=r)

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

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_progress.dec()
            endpoint = route_template(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)

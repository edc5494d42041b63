"""A worker's Prometheus metrics and trace spans.

Served on ``WORKER_METRICS_PORT`` (when > 0) by a small threaded HTTP server, from the worker's own
registry, always in the Prometheus text format: prometheus_client's own server would answer a
Prometheus that asks for OpenMetrics with ``vllm_...`` names, their colons escaped.

Names follow vLLM where vLLM has one, labelled by ``model_name``, so vLLM dashboards and autoscalers
(KEDA on ``vllm:num_requests_waiting``) work unchanged:

- gauges read at scrape time from each engine's ``EngineStats``: ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0..1), and the counters
  ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (tokens) and
  ``vllm:num_preemptions_total``;
- per request, observed when the worker has *published* the tokens (the Redis round trip done), so
  they are worker-side latencies: ``vllm:time_to_first_token_seconds`` (job taken from the stream ->
  first token published), ``vllm:inter_token_latency_seconds`` (between two publishes of one request),
  ``vllm:e2e_request_latency_seconds`` (job taken -> final event published),
  ``vllm:request_queue_time_seconds`` (job queued by the gateway -> taken by this worker; not
  observed for a job taken over from a dead worker), ``vllm:request_prefill_time_seconds``,
  ``vllm:request_decode_time_seconds``, ``vllm:request_prompt_tokens`` and
  ``vllm:request_generation_tokens`` (histograms), ``vllm:prompt_tokens_total`` (counted when the
  first token is out), ``vllm:generation_tokens_total`` (counted as published),
  ``vllm:request_success_total{finished_reason}`` (stop, length, cancelled);
- failures: ``llm_engine_errors_total{error_type}`` (engine: a forward or step failed; timeout: the
  deadline passed; request: the engine refused the request, e.g. too long for the KV cache),
  ``spindle_dead_letters_total``, ``spindle_takeovers_total`` (jobs resumed after their worker died),
  ``spindle_fenced_jobs_total`` (jobs this worker lost to another and stopped writing);
- per engine step (measured on the engine thread by ``MeteredEngine``): ``spindle_batch_size`` and
  ``spindle_step_seconds`` histograms;
- ``spindle_worker_info{worker_id,engine,device,dtype}`` (always 1), ``spindle_worker_draining``,
  ``spindle_worker_jobs{model_name}`` (jobs this worker holds, in the engine or about to be).

Tracing (``protocol.tracing``): a job's ``trace`` carrier, set by the gateway, is continued with a
``worker.request`` span and its children ``queue_wait``, ``prefill``, ``decode`` and ``publish`` (the
round trips that sent the first and the last tokens). Nothing is done when tracing is off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from protocol import tracing
from protocol.messages import Job
from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from worker.service import ActiveJob, Worker

log = logging.getLogger("worker.metrics")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SUCCESS_REASONS = frozenset({"stop", "length", "cancelled"})


def error_type(output: EngineOutput) -> str:
    """``llm_engine_errors_total``'s label for a request that ended in an error or a timeout."""
    if output.finish_reason == "timeout":
        return "timeout"
    if (output.error or "").startswith("engine error"):
        return "engine"
    return "request"


class WorkerMetrics:
    """The worker's registry; ``worker`` is read at scrape time (engines' stats, counters)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.registry = r = CollectorRegistry()
        by_model = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Job taken from the stream -> first token published", by_model,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two publishes of one request",
                             by_model, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Job taken from the stream -> final event "
                             "published", by_model, buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Job queued by the gateway -> taken "
                                    "by a worker", by_model, buckets=TTFT_BUCKETS, registry=r)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Job taken -> first token (prefill)",
                                      by_model, buckets=TTFT_BUCKETS, registry=r)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "First token -> last token (decode)",
                                     by_model, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request", by_model,
                                            buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens_hist = Histogram("vllm:request_generation_tokens", "Tokens generated per request",
                                                by_model, buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled", by_model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens published", by_model,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Requests finished (stop, length or cancelled)",
                               ["model_name", "finished_reason"], registry=r)
        self.errors = Counter("llm_engine_errors", "Requests that failed on this worker", ["error_type"],
                              registry=r)
        self.batch_size = Histogram("spindle_batch_size", "Sequences in one engine step", by_model,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("spindle_step_seconds", "Duration of one engine step", by_model,
                                      buckets=STEP_BUCKETS, registry=r)
        r.register(EngineCollector(worker))
        self._server: MetricsServer | None = None
        self._series: dict[str, ModelSeries] = {}

    def for_model(self, model: str) -> ModelSeries:
        """The model's labelled series, bound once (a ``labels()`` lookup costs more than an observation)."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = ModelSeries(self, model)
        return series

    # -- the HTTP endpoint -------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a thread; returns the port (0 when it could not bind: logged, not fatal)."""
        try:
            self._server = MetricsServer((host, port), self.registry)
        except OSError as e:
            log.error("worker metrics not served: cannot listen on %s:%d (%s)", host, port, e)
            return 0
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        bound = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- hooks -------------------------------------------------------------------------------------
    def metered(self, engine: Engine, model: str) -> MeteredEngine:
        return MeteredEngine(engine, self.batch_size.labels(model), self.step_seconds.labels(model))

    def track(self, job: Job, model: str, recovered: bool) -> RequestObs:
        """Start observing a job the worker has just taken from the stream."""
        return RequestObs(self, job, model, recovered)

    def published(self, outputs: list[tuple[ActiveJob, EngineOutput]], sent_at: float) -> None:
        """A step's outputs are published (``sent_at``: wall time the round trip started)."""
        now, wall = time.monotonic(), time.time()
        for active, output in outputs:
            if active.obs is not None:
                active.obs.published(output, now, wall, sent_at)


class MetricsServer(ThreadingHTTPServer):
    """``GET /metrics``: the registry in the Prometheus text format (version 0.0.4)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        super().__init__(address, MetricsHandler)


class MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class ModelSeries:
    """One model's children of the per-request metrics."""

    def __init__(self, m: WorkerMetrics, model: str) -> None:
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.queue_time = m.queue_time.labels(model)
        self.prefill_time = m.prefill_time.labels(model)
        self.decode_time = m.decode_time.labels(model)
        self.prompt_tokens_hist = m.prompt_tokens_hist.labels(model)
        self.generation_tokens_hist = m.generation_tokens_hist.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.generation_tokens = m.generation_tokens.labels(model)


class RequestObs:
    """One job's timings on this worker: metrics when its outputs are published, and its spans."""

    def __init__(self, metrics: WorkerMetrics, job: Job, model: str, recovered: bool) -> None:
        self.m = metrics
        self.s = metrics.for_model(model)
        self.job = job
        self.model = model
        self.taken = time.monotonic()
        self.taken_wall = time.time()
        self.first_token: float | None = None
        self.first_token_wall = 0.0
        self.last_token: float | None = None
        self.last_token_wall = 0.0
        self.tokens = 0
        self.span: Span | None = None
        if not recovered:
            self.s.queue_time.observe(max(0.0, self.taken_wall - job.created_at))
        tracer = tracing.tracer("spindle.worker")
        if tracer is not None:
            self._start_span(tracer, recovered)

    @property
    def trace_id(self) -> str | None:
        return tracing.span_trace_id(self.span) or tracing.trace_id_of(self.job.trace)

    def published(self, out: EngineOutput, now: float, wall: float, sent_at: float) -> None:
        s = self.s
        first = False
        if out.new_token_ids:
            if self.first_token is None:
                first = True
                self.first_token, self.first_token_wall = now, wall
                s.ttft.observe(now - self.taken)
                s.prefill_time.observe(now - self.taken)
                s.prompt_tokens.inc(len(self.job.prompt_token_ids))
                self._child("prefill", self.taken_wall, wall)
                self._child("publish", sent_at, wall, tokens=len(out.new_token_ids))
            else:
                s.itl.observe(now - (self.last_token or now))
            self.last_token, self.last_token_wall = now, wall
            self.tokens += len(out.new_token_ids)
            s.generation_tokens.inc(len(out.new_token_ids))
        if out.finish_reason is not None:
            self._finished(out, now, wall, sent_at, first)

    def _finished(self, out: EngineOutput, now: float, wall: float, sent_at: float, first: bool) -> None:
        s, model, reason = self.s, self.model, out.finish_reason or "stop"
        s.e2e.observe(now - self.taken)
        if reason in SUCCESS_REASONS:
            self.m.success.labels(model, reason).inc()
        else:
            self.m.errors.labels(error_type(out)).inc()
        if self.first_token is not None:
            s.decode_time.observe((self.last_token or now) - self.first_token)
            s.prompt_tokens_hist.observe(len(self.job.prompt_token_ids))
            s.generation_tokens_hist.observe(self.tokens)
        extra = {"request_id": self.job.request_id, "model": model, "worker_id": self.m.worker.id}
        if trace_id := self.trace_id:
            extra["trace_id"] = trace_id
        log.info("finished %s: %s, %d+%d tokens, %.3fs on this worker", self.job.request_id, reason,
                 len(self.job.prompt_token_ids), self.tokens, now - self.taken, extra=extra)
        if self.span is None:
            return
        if self.first_token is not None and self.last_token_wall > self.first_token_wall:
            self._child("decode", self.first_token_wall, self.last_token_wall, tokens=self.tokens - 1)
        if not first:  # else this round trip already has its span (the first token's)
            self._child("publish", sent_at, wall, tokens=len(out.new_token_ids), final=True)
        self.span.set_attributes({"spindle.finish_reason": reason, "gen_ai.usage.output_tokens": self.tokens})
        if reason not in SUCCESS_REASONS:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, out.error or reason))
        self.span.end(end_time=tracing.ns(wall))
        self.span = None

    def abandoned(self, why: str) -> None:
        """The job left this worker unfinished (handed back to the stream on drain or unload)."""
        if self.span is not None:
            self.span.add_event(why)
            self.span.set_attribute("spindle.finish_reason", why)
            self.span.end()
            self.span = None

    # -- spans ---------------------------------------------------------------------------------------
    def _start_span(self, tracer: Any, recovered: bool) -> None:
        from opentelemetry.trace import SpanKind

        job = self.job
        self.span = tracer.start_span(
            "worker.request", context=tracing.extract(job.trace), kind=SpanKind.CONSUMER,
            start_time=tracing.ns(self.taken_wall),
            attributes={"spindle.request_id": job.request_id, "gen_ai.request.model": self.model,
                        "spindle.worker_id": self.m.worker.id, "spindle.resumed": recovered,
                        "gen_ai.usage.input_tokens": len(job.prompt_token_ids),
                        "gen_ai.request.max_tokens": job.params.max_tokens})
        if not recovered:
            self._child("queue_wait", min(job.created_at, self.taken_wall), self.taken_wall)

    def _child(self, name: str, start: float, end: float, **attributes: Any) -> None:
        if self.span is None:
            return
        from opentelemetry.trace import set_span_in_context

        tracer = tracing.tracer("spindle.worker")
        if tracer is None:
            return
        child = tracer.start_span(name, context=set_span_in_context(self.span), start_time=tracing.ns(start),
                                  attributes={f"spindle.{k}": v for k, v in attributes.items()})
        child.end(end_time=tracing.ns(max(start, end)))


class MeteredEngine:
    """An engine whose every step's batch size and duration are observed (on the engine thread)."""

    def __init__(self, engine: Engine, batch_size: Any, step_seconds: Any) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._batch_size = batch_size
        self._step_seconds = step_seconds

    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - start
        n = self.engine.stats().last_batch_size
        if n:
            self._batch_size.observe(n)
            self._step_seconds.observe(elapsed)
        return outputs

    def add_request(self, request: EngineRequest) -> None:
        self.engine.add_request(request)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def __getattr__(self, name: str) -> Any:  # anything else an engine has (device, tokenizer, ...)
        return getattr(self.engine, name)


class EngineCollector(Collector):
    """Gauges and counters read at scrape time from the worker's engines and counters (no locks held)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        labels = ["model_name"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine's running batch",
                                    labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting in the engine", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache blocks in use (1 = full)", labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels=labels)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Sequences preempted (KV recomputed later)",
                                      labels=labels)
        jobs = GaugeMetricFamily("spindle_worker_jobs", "Jobs this worker holds", labels=labels)
        for model, server in list(w.servers.items()):
            st = server.thread.stats()
            running.add_metric([model], st.running)
            waiting.add_metric([model], st.waiting)
            kv.add_metric([model], st.kv_usage)
            queries.add_metric([model], st.prefix_cache_queries)
            hits.add_metric([model], st.prefix_cache_hits)
            preempt.add_metric([model], st.preemptions)
            jobs.add_metric([model], len(server.jobs))
        yield from (running, waiting, kv, queries, hits, preempt, jobs)
        yield CounterMetricFamily("spindle_takeovers", "Jobs resumed after their worker died", value=w.takeovers)
        yield CounterMetricFamily("spindle_dead_letters", "Jobs moved to the dead-letter stream", value=w.dead_letters)
        yield CounterMetricFamily("spindle_fenced_jobs", "Jobs dropped because Redis refused their writes (another "
                                  "worker owns them now)", value=w.fenced)
        yield GaugeMetricFamily("spindle_worker_draining", "1 while the worker drains (SIGTERM)",
                                value=1 if w.draining else 0)
        first = next(iter(list(w.servers.values())), None)
        info = GaugeMetricFamily("spindle_worker_info", "This worker (always 1)",
                                 labels=["worker_id", "engine", "device", "dtype"])
        info.add_metric([w.id, w.settings.engine, first.device if first else "", first.dtype if first else ""], 1)
        yield info

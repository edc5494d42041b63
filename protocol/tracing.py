"""OpenTelemetry tracing shared by every service, off (and free) unless it is configured.

``setup_tracing("gateway")`` turns tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set: spans go to that OTLP endpoint over HTTP/protobuf
(e.g. ``http://otel-collector:4318``) in batches, from a background thread. Tests pass their own
exporter (an ``InMemorySpanExporter``) instead. Otherwise nothing is set up: ``tracer()`` returns
None, call sites skip all span work, and the OpenTelemetry SDK is never imported.

One request's trace crosses the Redis hop in ``Job.trace``: the gateway ``inject``s the W3C trace
context (``traceparent``) of its request span there, and the worker ``extract``s it and continues the
trace with its own spans (queue wait, prefill, decode, publish).

The provider is this module's, not OpenTelemetry's global one, so a test can set it up and tear it
down again (the global can be set only once per process).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

_provider: TracerProvider | None = None


def otlp_endpoint() -> str | None:
    for name in ENDPOINT_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process (see the module doc); True when it is on."""
    global _provider
    if exporter is None and otlp_endpoint() is None:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk is not installed: tracing off")
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("opentelemetry-exporter-otlp-proto-http is not installed: tracing off")
            return False
        # The exporter reads the endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    shutdown_tracing()
    _provider = provider
    log.info("tracing on: %s", "custom exporter" if exporter is not None else otlp_endpoint())
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and turn tracing off."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _provider is not None


def tracer(name: str) -> Tracer | None:
    """A tracer (``name``: the instrumentation scope, e.g. ``spindle.worker``), or None when tracing is off."""
    return _provider.get_tracer(name) if _provider is not None else None


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C trace context of ``context`` (default: the current one) as a carrier; {} when off."""
    if _provider is None:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The context a carrier (a job's ``trace``, HTTP headers) continues; None when off or empty."""
    if _provider is None or not carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def current_span() -> Span | None:
    """The span of the current context when tracing is on and one is recording, else None."""
    if _provider is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


def span_trace_id(span: Span | None) -> str | None:
    if span is None:
        return None
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits), for log lines; None when tracing is off or no span."""
    return span_trace_id(current_span()) if _provider is not None else None


def trace_id_of(carrier: Mapping[str, str]) -> str | None:
    """The trace id in a carrier's ``traceparent`` (no SDK needed), or None."""
    m = TRACEPARENT_RE.match(carrier.get("traceparent", "")) if carrier else None
    return m.group(1) if m else None


def ns(unix_seconds: float) -> int:
    """Unix seconds as the nanoseconds OpenTelemetry timestamps are."""
    return int(unix_seconds * 1e9)

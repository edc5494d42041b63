"""One request's trace crosses the Redis hop: an in-memory span exporter sees the gateway's request span
and the worker's spans (queue wait, prefill, decode, publish) in one trace, continuing the client's
``traceparent``; and the JSON log lines of both services carry the request id, trace id, model and
worker id."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protocol import tracing
from protocol.logs import JSONFormatter
from tests.integration.gateway_harness import MODEL
from tests.integration.metrics_stack import eventually, observed_stack

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("test", exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


async def test_one_trace_spans_gateway_and_worker(redis_url, tiny_artifacts, tmp_path, spans, caplog):
    caplog.set_level(logging.INFO, logger="worker.metrics")
    caplog.set_level(logging.INFO, logger="gateway.generation")
    async with observed_stack(redis_url, tiny_artifacts, tmp_path) as stack:
        reply = await stack.http.post(
            stack.gateway.url + "/v1/completions",
            json={"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "X-Request-ID": "trace-me"})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == "trace-me"

        def names() -> set[str]:
            return {s.name for s in spans.get_finished_spans()}

        wanted = {"POST /v1/completions", "worker.request", "queue_wait", "prefill", "decode", "publish"}
        await eventually(lambda: wanted <= names(), what=f"spans {wanted}")
        worker_id = stack.worker.id

    assert not [s.name for s in spans.get_finished_spans() if s.name.startswith("GET")], "probes are not traced"
    finished = [s for s in spans.get_finished_spans() if s.name in wanted]
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}
    by_name = {s.name: s for s in finished}
    server, request = by_name["POST /v1/completions"], by_name["worker.request"]
    assert server.instrumentation_scope.name == "spindle.gateway"
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert server.attributes["http.route"] == "/v1/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["spindle.request_id"] == "trace-me"
    assert [e.name for e in server.events] == ["first_token"]
    # The worker's span is a child of the gateway's, across Redis; its phases are children of it.
    assert request.instrumentation_scope.name == "spindle.worker"
    assert request.parent.span_id == server.context.span_id
    assert request.attributes["spindle.worker_id"] == worker_id
    assert request.attributes["gen_ai.usage.output_tokens"] == 4
    for phase in ("queue_wait", "prefill", "decode", "publish"):
        assert by_name[phase].parent.span_id == request.context.span_id, phase
    assert sum(s.name == "publish" for s in finished) == 2  # the first token's round trip, and the last's
    assert by_name["queue_wait"].end_time <= by_name["prefill"].start_time + 1  # ns; phases in order
    assert by_name["prefill"].end_time <= by_name["decode"].start_time + 1

    lines = {r.name: json.loads(JSONFormatter("svc").format(r)) for r in caplog.records
             if r.name in ("worker.metrics", "gateway.generation")}
    assert lines["worker.metrics"]["trace_id"] == TRACE_ID
    assert lines["worker.metrics"]["worker_id"] == worker_id
    assert lines["worker.metrics"]["model"] == MODEL
    assert lines["worker.metrics"]["request_id"].startswith("cmpl")
    assert lines["gateway.generation"]["trace_id"] == TRACE_ID
    assert lines["gateway.generation"]["request_id"] == "trace-me"
    assert lines["gateway.generation"]["model"] == MODEL


def test_tracing_is_off_without_an_endpoint(monkeypatch):
    for name in tracing.ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing("test") is False
    assert not tracing.enabled() and tracing.tracer("x") is None
    assert tracing.inject() == {} and tracing.extract({"traceparent": "x"}) is None
    assert tracing.current_trace_id() is None
    assert tracing.trace_id_of({"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}) == TRACE_ID
    assert tracing.trace_id_of({"traceparent": "garbage"}) is None

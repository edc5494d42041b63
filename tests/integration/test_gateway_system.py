"""Health, readiness, model listing, docs, metrics, and living through a Redis restart."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from launcher.redis_server import RedisProcess
from protocol.messages import TokenEvent
from tests.integration.gateway_harness import (
    MODEL,
    AutoResponder,
    FakeWorker,
    gateway_settings,
    running_gateway,
)


@pytest.fixture
def gw(redis_url, tiny_artifacts, tmp_path):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path)) as g:
        yield g


def eventually(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if m.group(1) == name and all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def test_health_and_readiness_follow_the_heartbeat(gw, redis_url):
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    r = httpx.get(gw.url + "/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert r.json()["checks"]["redis"] is True and r.json()["checks"]["workers_for_default_model"] == 0

    other = FakeWorker(redis_url, models=["tiny-gpt2"], worker_id="other")
    other.heartbeat()
    time.sleep(1.2)  # past the registry's cache; a worker for another model does not make us ready
    assert httpx.get(gw.url + "/ready").status_code == 503

    worker = FakeWorker(redis_url)
    worker.heartbeat(ttl=2)
    eventually(lambda: httpx.get(gw.url + "/ready").status_code == 200, what="ready")
    assert httpx.get(gw.url + "/ready").json()["checks"]["workers_for_default_model"] == 1
    # the heartbeat key expires: the worker is gone
    eventually(lambda: httpx.get(gw.url + "/ready").status_code == 503, what="not ready after expiry")

    worker.heartbeat(draining=True)
    time.sleep(1.2)
    assert httpx.get(gw.url + "/ready").status_code == 503  # a draining worker takes no new jobs


def test_models_list_marks_served_models(gw, redis_url):
    worker = FakeWorker(redis_url, models=[MODEL, "remote-only"])
    worker.heartbeat()
    time.sleep(1.2)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny-llama", "tiny-qwen2", "tiny-gpt2", "remote-only"} <= set(models)
    assert models["tiny-llama"].served is True and models["tiny-qwen2"].served is False
    assert models["tiny-llama"].context_length == 512 and models["tiny-llama"].in_store is True
    assert models["remote-only"].in_store is False and models["remote-only"].served is True
    one = client.models.retrieve("tiny-gpt2")
    assert one.id == "tiny-gpt2" and one.served is False


def test_docs_and_openapi(gw):
    assert httpx.get(gw.url + "/docs").status_code == 200
    spec = httpx.get(gw.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/stream", "/completion",
                 "/health", "/ready", "/metrics"):
        assert path in spec["paths"], path
    assert '"422"' not in json.dumps(spec)  # validation errors are documented (and returned) as 400
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_metrics_after_a_known_workload(gw, redis_url):
    worker = FakeWorker(redis_url)
    worker.heartbeat()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with AutoResponder(worker, lambda job: ["a", "b", "c"]) as responder:
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9)
        list(client.completions.create(model=MODEL, prompt="To be", max_tokens=9, stream=True))
    httpx.post(gw.url + "/v1/chat/completions", json={"messages": []})
    prompt_total = sum(len(j.prompt_token_ids) for j in responder.jobs)
    text = httpx.get(gw.url + "/metrics").text

    assert metric(text, "llm_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert metric(text, "llm_requests_total", endpoint="/v1/completions", status="200") == 1
    assert metric(text, "llm_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert metric(text, "llm_request_duration_seconds_count", endpoint="/v1/completions") == 1
    assert metric(text, "llm_requests_in_progress") == 1  # this /metrics request
    assert metric(text, "vllm:prompt_tokens_total", model_name=MODEL) == prompt_total
    assert metric(text, "vllm:generation_tokens_total", model_name=MODEL) == 9
    assert metric(text, "vllm:time_to_first_token_seconds_count", model_name=MODEL) == 3
    assert metric(text, "vllm:e2e_request_latency_seconds_count", model_name=MODEL) == 3
    assert metric(text, "vllm:request_queue_time_seconds_count", model_name=MODEL) == 3
    assert metric(text, "vllm:request_success_total", model_name=MODEL, finished_reason="stop") == 3
    assert 'endpoint="/v1/models/{model_id}"' not in text  # templates only appear once used
    httpx.get(gw.url + "/v1/models/whatever")
    assert 'endpoint="/v1/models/{model_id}"' in httpx.get(gw.url + "/metrics").text


def test_redis_restart_fails_in_flight_fast_and_recovers(tiny_artifacts, tmp_path):
    """Redis goes away mid-stream: the stream ends with a 503 error event at once, /ready turns 503, new
    requests get 503; when Redis is back the gateway resubscribes and serves again."""
    server = RedisProcess(tmp_path / "redis").start()
    settings = gateway_settings(server.url, tiny_artifacts, tmp_path)
    try:
        with running_gateway(settings) as g:
            worker = FakeWorker(server.url)
            worker.heartbeat()
            eventually(lambda: httpx.get(g.url + "/ready").status_code == 200, what="ready")
            result: dict = {}

            def stream():
                result["r"] = httpx.post(g.url + "/v1/completions", timeout=30,
                                         json={"prompt": "x", "max_tokens": 5, "stream": True})

            t = threading.Thread(target=stream)
            t.start()
            _entry, job = worker.take_job()
            worker.publish(g.gateway_id, [TokenEvent(request_id=job.request_id, seq=0, token_ids=[1], text="a")])
            server.stop()
            t.join(20)
            events = [block.split("\n")[-1] for block in result["r"].text.split("\n\n") if block]  # data lines
            err = json.loads(events[-2].removeprefix("data: "))["error"]
            assert err["code"] == "redis_unavailable" and events[-1] == "data: [DONE]"

            assert httpx.get(g.url + "/ready").status_code == 503
            r = httpx.post(g.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
            assert r.status_code == 503 and "retry-after" in r.headers

            server.start()
            worker = FakeWorker(server.url)
            worker.heartbeat()
            eventually(lambda: httpx.get(g.url + "/ready").status_code == 200, what="ready after restart")
            with AutoResponder(worker, lambda job: ["back"]):
                r = httpx.post(g.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "back"
    finally:
        server.stop()

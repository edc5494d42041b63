"""``ui.client`` and ``ui.series`` on their own: readable errors for what goes wrong on the way (a service
that is down, one that never answers, error answers in the OpenAI shape), and the metrics history fed
with the gateway's real Prometheus output.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from gateway.metrics import GatewayMetrics
from launcher.redis_server import free_port
from ui import series
from ui.client import ChatResult, GatewayClient, ManagerClient, ServiceError, error_from_body, job_fraction


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_service_down_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError) as e:
        GatewayClient(url).models()
    assert e.value.kind == "unreachable"
    assert e.value.message.startswith(f"Cannot reach the gateway at {url}")
    with pytest.raises(ServiceError) as e:
        GatewayClient(url).chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)
    assert e.value.kind == "unreachable"
    with pytest.raises(ServiceError) as e:
        ManagerClient(url).status()
    assert "model-manager" in e.value.message


def test_no_answer_is_a_timeout(silent_server: str) -> None:
    client = ManagerClient(silent_server)
    with pytest.raises(ServiceError) as e:
        client._json("GET", "/models", timeout=0.3)
    assert e.value.kind == "timeout"
    assert e.value.message == f"Timed out: the model-manager at {silent_server} did not answer within 0.3 s."


def test_error_answers_become_readable_messages() -> None:
    body = {"error": {"message": "The queue for model 'm' is full", "type": "server_overloaded",
                      "param": None, "code": "queue_full"}}
    e = error_from_body("gateway", 429, body, httpx.Headers({"Retry-After": "2"}))
    assert (e.kind, e.retry_after, e.code) == ("overloaded", 2.0, "queue_full")
    assert e.message == "The server is overloaded: The queue for model 'm' is full. Try again in 2 s."
    e = error_from_body("model-manager", 401, {"error": {"message": "needs the admin key", "code": "invalid_api_key"}})
    assert e.kind == "auth" and "set ADMIN_API_KEY" in e.message
    e = error_from_body("gateway", 504, {"error": {"message": "No tokens for 60s", "code": "timeout"}})
    assert e.kind == "timeout" and e.message == "Timed out: No tokens for 60s"
    e = error_from_body("gateway", 502, "<html>bad gateway</html>")
    assert e.message == "HTTP 502: <html>bad gateway</html>"


def test_stream_chunks_fill_the_result_and_errors_inside_raise() -> None:
    gw = GatewayClient("http://127.0.0.1:1")
    res = ChatResult()
    assert gw._apply('{"choices":[{"delta":{"role":"assistant"}}]}', res) == []
    assert gw._apply('{"choices":[{"delta":{"content":"Hel"}}]}', res) == ["Hel"]
    assert gw._apply('{"choices":[{"delta":{"content":"lo"},"finish_reason":"length"}]}', res) == ["lo"]
    assert gw._apply('{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}', res) == []
    assert (res.text, res.finish_reason, res.tokens, res.prompt_tokens) == ("Hello", "length", 5, 3)
    assert res.ttft is not None and res.ttft >= 0
    with pytest.raises(ServiceError) as e:
        gw._apply('{"error":{"message":"Generation failed on the worker: boom","code":"engine_error"}}', res)
    assert e.value.kind == "stream" and "boom" in e.value.message


def test_job_fraction() -> None:
    assert job_fraction({"stage": "downloading", "bytes_done": 50, "bytes_total": 200}) == 0.25
    assert job_fraction({"stage": "queued"}) == 0.0
    assert job_fraction({"stage": "ready", "bytes_done": 0, "bytes_total": 0}) == 1.0


def test_history_rates_from_the_gateways_metrics() -> None:
    m = GatewayMetrics()
    history = series.History(window_s=60, min_interval=1.0)
    assert history.add(series.parse(m.render().decode(), at=100.0))
    m.generation_tokens.labels("m").inc(40)
    m.success.labels("m", "stop").inc(2)
    m.ttft.labels("m").observe(0.1)
    m.ttft.labels("m").observe(0.3)
    assert not history.add(series.parse(m.render().decode(), at=100.5))  # younger than min_interval
    assert history.add(series.parse(m.render().decode(), at=102.0))
    (rate,) = history.rates()
    assert (rate.model, rate.tokens_per_s, rate.requests_per_s) == ("m", 20.0, 1.0)
    assert rate.ttft_mean_s == pytest.approx(0.2)
    assert 0.1 <= history.window_ttft_quantile(0.95, "m") <= 0.5
    # The gateway restarted: its counters start again from zero; no negative rate, a new baseline.
    restarted = GatewayMetrics()
    restarted.generation_tokens.labels("m").inc(5)
    history.add(series.parse(restarted.render().decode(), at=103.0))
    assert len(history.rates()) == 1
    # Samples older than the window are dropped.
    history.add(series.parse(restarted.render().decode(), at=200.0))
    assert [s.at for s in history.samples()] == [200.0]


def test_quantile_interpolates_inside_a_bucket() -> None:
    assert series.quantile(0.5, {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}) == pytest.approx(0.15)
    assert series.quantile(0.99, {0.1: 0.0, float("inf"): 4.0}) == 0.1
    assert series.quantile(0.5, {}) is None

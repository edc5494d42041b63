"""Bad input, unknown or unserved models, admission limits: each an OpenAI-shaped 4xx (or 503), and
nothing reaches the job stream."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.integration.gateway_harness import MODEL, CancelListener, FakeWorker, gateway_settings, running_gateway

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def worker(redis_url):
    w = FakeWorker(redis_url, models=[MODEL, "tiny-gpt2"])
    w.heartbeat()
    return w


@pytest.fixture
def gw(redis_url, tiny_artifacts, tmp_path):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path)) as g:
        yield g


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def nothing_queued(worker: FakeWorker) -> bool:
    return all(worker.queued(m) == 0 for m in (MODEL, "tiny-qwen2", "tiny-gpt2", "no-such-model"))


BAD_JSON_BODIES = [
    pytest.param(CHAT, {"messages": "hello"}, "messages", id="messages-not-a-list"),
    pytest.param(CHAT, {"messages": []}, "messages", id="empty-messages"),
    pytest.param(CHAT, {}, "messages", id="missing-messages"),
    pytest.param(CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", id="bad-role"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": 5}]}, None, id="content-not-text"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, id="image-part"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "max_tokens": -1}, "max_tokens", id="negative-max-tokens"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens", id="zero-max-tokens"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "max_tokens": 1.5}, "max_tokens", id="fractional-max-tokens"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "max_tokens": "5"}, "max_tokens", id="string-max-tokens"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "max_tokens": 10**30}, "max_tokens", id="absurd-max-tokens"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "temperature": "hot"}, "temperature", id="string-temperature"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "temperature": -1}, "temperature", id="negative-temperature"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "top_p": 0}, "top_p", id="zero-top-p"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "stream": "yes"}, "stream", id="string-stream"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "n": 17}, "n", id="n-over-max"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "n": 0}, "n", id="n-0"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "stop": ""}, "stop", id="empty-stop"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "stop": ["a"] * 17}, "stop", id="too-many-stops"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "seed": 2**70}, "seed", id="huge-seed"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "tools": [{"type": "function"}]}, "tools", id="tools"),
    pytest.param(CHAT, {"messages": OK_MESSAGES, "model": 7}, "model", id="model-not-a-string"),
    pytest.param(CHAT, [1, 2, 3], None, id="body-is-an-array"),
    pytest.param(COMPLETIONS, {"prompt": 5}, None, id="prompt-not-text"),
    pytest.param(COMPLETIONS, {"prompt": ["a", "b"]}, "prompt", id="two-prompts"),
    pytest.param(COMPLETIONS, {"prompt": "x", "echo": True}, "echo", id="echo"),
    pytest.param(COMPLETIONS, {"prompt": "x", "logprobs": 50}, "logprobs", id="too-many-logprobs"),
    pytest.param(COMPLETIONS, {"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param(COMPLETIONS, {"prompt": [10**6]}, "prompt", id="token-outside-vocab"),
    pytest.param(COMPLETIONS, {"prompt": [-1]}, "prompt", id="negative-token"),
    pytest.param("/generate", {"prompt": ""}, "prompt", id="generate-empty-prompt"),
    pytest.param("/generate", {"prompt": "x", "max_new_tokens": -5}, "max_new_tokens", id="generate-negative"),
    pytest.param("/completion", {"prompt": "x", "n_predict": 0}, "n_predict", id="llama-n-predict-0"),
    pytest.param("/completion", {"prompt": "x", "temperature": []}, "temperature", id="llama-wrong-type"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_JSON_BODIES)
def test_invalid_bodies_are_400(gw, worker, path, body, param):
    err = assert_openai_error(httpx.post(gw.url + path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert nothing_queued(worker)


DEEP = b'{"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}"


@pytest.mark.parametrize("raw", [b'{"messages": [', b"not json at all", b'{"messages": [}]}', b"\xff\xfe{", DEEP],
                         ids=["truncated", "not-json", "bad-syntax", "not-utf8", "nested-too-deep"])
def test_malformed_json_is_400(gw, worker, raw):
    r = httpx.post(gw.url + CHAT, content=raw, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["code"] == "invalid_json" or "JSON" in err["message"]
    assert nothing_queued(worker)


@pytest.mark.parametrize(("path", "raw", "param"), [
    (COMPLETIONS, b'{"prompt": "\\ud800x"}', "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (COMPLETIONS, b'{"prompt": "ok", "stop": ["\\ud800"]}', "stop"),
])
def test_lone_surrogates_are_400(gw, worker, path, raw, param):
    """JSON escapes can encode text that is not valid Unicode; it must not reach a tokenizer or Redis."""
    r = httpx.post(gw.url + path, content=raw, headers={"content-type": "application/json"})
    assert "Unicode" in assert_openai_error(r, 400, param)["message"]
    assert nothing_queued(worker)


def test_wrong_content_type_is_400(gw, worker):
    r = httpx.post(gw.url + CHAT, content=json.dumps({"messages": OK_MESSAGES}),
                   headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]
    assert nothing_queued(worker)


def test_oversized_body_is_413(redis_url, tiny_artifacts, tmp_path, worker):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path, max_request_bytes=2000)) as g:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        assert_openai_error(httpx.post(g.url + CHAT, json=big), 413)

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"x" * 500

        assert_openai_error(httpx.post(g.url + CHAT, content=chunks(), headers={"content-type": "application/json"}),
                            413)
        assert httpx.post(g.url + CHAT, json={"messages": []}).status_code == 400  # small bodies still pass
    assert nothing_queued(worker)


def test_unknown_route_and_wrong_method(gw):
    assert assert_openai_error(httpx.get(gw.url + "/v1/nothing-here"), 404)["type"] == "not_found_error"
    assert assert_openai_error(httpx.get(gw.url + CHAT), 405)["code"] == "method_not_allowed"
    assert assert_openai_error(httpx.delete(gw.url + "/v1/models"), 405)


def test_unknown_model_is_404(gw, worker):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=OK_MESSAGES)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    for name in ("../etc/passwd", "a" * 300, "..", "tiny-llama/../tiny-gpt2"):
        assert_openai_error(httpx.post(gw.url + COMPLETIONS, json={"model": name, "prompt": "x"}), 404, "model")
    assert_openai_error(httpx.get(gw.url + "/v1/models/no-such-model"), 404)
    assert nothing_queued(worker)


def test_model_without_live_worker_is_503(gw, worker):
    """tiny-qwen2 is in the store but no worker serves it; a draining worker does not count either."""
    r = httpx.post(gw.url + CHAT, json={"model": "tiny-qwen2", "messages": OK_MESSAGES})
    err = assert_openai_error(r, 503)
    assert err["code"] == "model_not_served" and int(r.headers["retry-after"]) > 0
    assert nothing_queued(worker)


def test_prompt_longer_than_context_is_400_naming_both_numbers(gw, worker):
    long_prompt = "To be, or not to be, that is the question: " * 60  # far more than 512 tokens
    r = httpx.post(gw.url + COMPLETIONS, json={"prompt": long_prompt, "max_tokens": 10})
    err = assert_openai_error(r, 400, "max_tokens")
    assert err["code"] == "context_length_exceeded" and "512" in err["message"] and " 10 " in err["message"]
    r = httpx.post(gw.url + CHAT, json={"messages": OK_MESSAGES, "max_tokens": 510})
    err = assert_openai_error(r, 400, "max_tokens")
    assert "512" in err["message"] and "510" in err["message"]
    r = httpx.post(gw.url + CHAT, json={"messages": OK_MESSAGES, "max_completion_tokens": 1000})
    assert_openai_error(r, 400, "max_completion_tokens")
    r = httpx.post(gw.url + "/completion", json={"prompt": long_prompt})  # no n_predict: prompt alone too long
    assert "512" in assert_openai_error(r, 400)["message"]
    assert nothing_queued(worker)


def test_queue_full_is_429_with_retry_after(redis_url, tiny_artifacts, tmp_path, worker):
    """Capacity 2, no worker reading: two jobs wait, the third is refused; taking one frees a place."""
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, queue_capacity=2)
    body = {"prompt": "x", "max_tokens": 5, "stream": True}
    with running_gateway(settings) as g, httpx.Client(base_url=g.url, timeout=30) as http:
        with http.stream("POST", COMPLETIONS, json=body) as r1, http.stream("POST", COMPLETIONS, json=body) as r2:
            assert r1.status_code == 200 and r2.status_code == 200
            r3 = http.post(COMPLETIONS, json=body)
            err = assert_openai_error(r3, 429)
            assert err["type"] == "server_overloaded" and int(r3.headers["retry-after"]) >= 1
            assert worker.queued() == 2
            worker.take_job()  # delivered to a worker: no longer waiting
            with http.stream("POST", COMPLETIONS, json=body) as r4:
                assert r4.status_code == 200
        metrics = http.get("/metrics").text
    assert 'spindle_admission_rejections_total{reason="queue_full"} 1.0' in metrics


def test_n_choices_are_admitted_all_or_nothing(redis_url, tiny_artifacts, tmp_path, worker):
    """Capacity 2: n=3 is refused whole (429), and the two choices it had queued are cancelled."""
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, queue_capacity=2)
    cancels = CancelListener(redis_url)
    try:
        with running_gateway(settings) as g:
            r = httpx.post(g.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 5, "n": 3}, timeout=30)
            assert assert_openai_error(r, 429)["type"] == "server_overloaded" and "retry-after" in r.headers
            queued = [worker.take_job(timeout=2)[1].request_id for _ in range(2)]
            assert [q.rsplit("-", 1)[1] for q in queued] == ["0", "1"]
            assert all(cancels.wait_for(q) for q in queued)
    finally:
        cancels.close()


def test_api_keys_and_per_key_concurrency(redis_url, tiny_artifacts, tmp_path, worker):
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, api_keys="key-one, key-two",
                                max_concurrent_requests=1)
    body = {"prompt": "x", "max_tokens": 5, "stream": True}
    with running_gateway(settings) as g, httpx.Client(base_url=g.url, timeout=30) as http:
        r = http.post(COMPLETIONS, json=body)
        assert assert_openai_error(r, 401)["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        assert_openai_error(http.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401)
        for open_path in ("/health", "/ready", "/metrics"):
            assert http.get(open_path).status_code in (200, 503)
        one = {"Authorization": "Bearer key-one"}
        assert http.get("/v1/models", headers=one).status_code == 200
        with http.stream("POST", COMPLETIONS, json=body, headers=one) as first:
            assert first.status_code == 200
            second = http.post(COMPLETIONS, json=body, headers=one)
            assert assert_openai_error(second, 429)["code"] == "concurrency_limit"
            assert "retry-after" in second.headers
            other = {"Authorization": "Bearer key-two"}
            with http.stream("POST", COMPLETIONS, json=body, headers=other) as third:
                assert third.status_code == 200  # another key has its own limit
        # the first stream was closed: its slot is freed as soon as the gateway sees the disconnect
        deadline = time.monotonic() + 10
        while True:
            with http.stream("POST", COMPLETIONS, json=body, headers=one) as again:
                if again.status_code == 200:
                    break
                assert again.status_code == 429 and time.monotonic() < deadline, "the slot was never released"
            time.sleep(0.05)
    assert worker.queued() >= 3

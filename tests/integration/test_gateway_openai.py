"""The gateway's half of the protocol, through its OpenAI and native APIs, against real Redis.

The worker's half is played by ``FakeWorker``: each test reads the ``Job`` the gateway queued and
publishes the ``EventBatch`` events it wants the gateway to handle.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from protocol.messages import TokenEvent, TokenLogprob
from tests.integration.gateway_harness import (
    MODEL,
    AutoResponder,
    CancelListener,
    FakeWorker,
    gateway_settings,
    running_gateway,
)

PIECES = ["Hello", ",", " world", "\nand a\n\nnewline", " \"quoted\" ", "data: [DONE]", " end"]


@pytest.fixture
def worker(redis_url):
    w = FakeWorker(redis_url)
    w.heartbeat()
    return w


@pytest.fixture
def gw(redis_url, tiny_artifacts, tmp_path):
    with running_gateway(gateway_settings(redis_url, tiny_artifacts, tmp_path)) as g:
        yield g


@pytest.fixture
def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def tokenizer(tiny_artifacts):
    return AutoTokenizer.from_pretrained(tiny_artifacts / MODEL)


def sse_events(text: str) -> list[dict[str, str]]:
    """Parse an SSE body strictly: blocks separated by a blank line, each line ``field: value``."""
    assert text.endswith("\n\n"), text[-50:]
    events = []
    for block in text[:-2].split("\n\n"):
        ev: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            assert sep and name in ("data", "event", "id"), f"bad SSE line {line!r}"
            ev[name] = value
        events.append(ev)
    return events


def test_chat_non_streaming_with_openai_client(gw, client, worker, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not?"}]
    with AutoResponder(worker, lambda job: PIECES) as responder:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, temperature=0.5,
                                           top_p=0.9, seed=42, stop=["STOP"], presence_penalty=0.5,
                                           extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "".join(PIECES)
    assert r.choices[0].finish_reason == "stop"
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == len(PIECES)
    assert r.usage.total_tokens == r.usage.prompt_tokens + len(PIECES)

    (job,) = responder.jobs
    assert job.request_id == r.id and job.gateway_id == gw.gateway_id and job.model == MODEL
    assert job.prompt_token_ids == list(expected_prompt)
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (50, 0.5, 0.9, 42, ["STOP"])
    assert (p.top_k, p.repetition_penalty, p.presence_penalty) == (5, 1.1, 0.5)
    assert job.deadline is not None and job.deadline > time.time()


def test_chat_streaming_with_include_usage(client, worker):
    with AutoResponder(worker, lambda job: PIECES):
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=20, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in with_choices[1:])
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "".join(PIECES)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(PIECES)
    assert last.usage.total_tokens == last.usage.prompt_tokens + len(PIECES)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_completions_streaming_and_not(client, worker, tokenizer):
    with AutoResponder(worker, lambda job: PIECES) as responder:
        full = client.completions.create(model=MODEL, prompt="To be", max_tokens=len(PIECES))
        streamed = list(client.completions.create(model=MODEL, prompt="To be", max_tokens=len(PIECES),
                                                  stream=True))
        by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3)
    assert full.object == "text_completion" and full.choices[0].text == "".join(PIECES)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer("To be")["input_ids"])
    assert "".join(c.choices[0].text for c in streamed) == "".join(PIECES)
    assert streamed[-1].choices[0].finish_reason == "length"
    assert responder.jobs[0].prompt_token_ids == tokenizer("To be")["input_ids"]
    assert responder.jobs[2].prompt_token_ids == [5, 6, 7] and by_ids.usage.prompt_tokens == 3


def test_sse_framing_is_exact(gw, worker):
    """Raw bytes: every event is ``id: <request id>:<position>`` (growing) then ``data: <json>``;
    newlines inside tokens are escaped; [DONE] last."""
    with AutoResponder(worker, lambda job: PIECES):
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert r.text.startswith("id: ") and all(list(e) == ["id", "data"] for e in events)
    assert events[-1]["data"] == "[DONE]"
    payloads = [json.loads(e["data"]) for e in events[:-1]]
    positions = [int(e["id"].rpartition(":")[2]) for e in events]
    assert {e["id"].rpartition(":")[0] for e in events} == {payloads[0]["id"]}
    assert positions == sorted(set(positions)) and positions[0] == 0  # 0: the role chunk
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == "".join(PIECES)
    assert all("usage" not in p for p in payloads)  # only with include_usage


def test_duplicate_and_out_of_order_events(gw, client, worker):
    """seq decides the order; an event seen twice is delivered once."""
    result: dict = {}

    def call():
        result["r"] = client.completions.create(model=MODEL, prompt="x", max_tokens=10)

    t = threading.Thread(target=call)
    t.start()
    _entry, job = worker.take_job()
    a, b, c, d = worker.events_for(job, ["A", "B", "C", "D"], "stop")
    for batch in ([c], [a, b], [a], [b, c], [d], [d]):
        worker.publish(gw.gateway_id, batch)
    t.join(30)
    r = result["r"]
    assert r.choices[0].text == "ABCD" and r.usage.completion_tokens == 4


def test_many_events_in_one_batch_and_logprobs(gw, client, worker):
    result: dict = {}

    def call():
        result["r"] = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10, logprobs=True,
            top_logprobs=2)

    t = threading.Thread(target=call)
    t.start()
    _entry, job = worker.take_job()
    assert job.params.logprobs == 2
    events = worker.events_for(job, ["a", "b"], "length")
    for ev in events:
        ev.logprobs = [TokenLogprob(token_id=1, token=ev.text, logprob=-0.5,
                                    top=[(1, ev.text, -0.5), (2, "z", -20.0)])]
    worker.publish(gw.gateway_id, events)
    t.join(30)
    r = result["r"]
    lps = r.choices[0].logprobs.content
    assert [x.token for x in lps] == ["a", "b"] and lps[0].logprob == -0.5
    assert lps[0].top_logprobs[1].logprob == -20.0
    assert r.choices[0].finish_reason == "length"


def test_worker_error_becomes_openai_error(gw, client, worker):
    def respond():
        _entry, job = worker.take_job()
        worker.publish(gw.gateway_id, [TokenEvent(request_id=job.request_id, seq=0, finish_reason="error",
                                                  error="CUDA out of memory")])

    t = threading.Thread(target=respond)
    t.start()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5)
    t.join(10)
    assert "CUDA out of memory" in str(e.value)
    assert e.value.body["type"] == "server_error"


def test_streaming_error_after_start_is_an_error_event(gw, worker):
    def respond():
        _entry, job = worker.take_job()
        ev = worker.events_for(job, ["ok"], "stop")[0]
        ev.finish_reason = None
        worker.publish(gw.gateway_id, [ev, TokenEvent(request_id=job.request_id, seq=1, finish_reason="error",
                                                      error="boom")])

    t = threading.Thread(target=respond)
    t.start()
    r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}, timeout=30)
    t.join(10)
    events = sse_events(r.text)
    assert json.loads(events[0]["data"])["choices"][0]["text"] == "ok"
    err = json.loads(events[-2]["data"])["error"]
    assert err["code"] == "engine_error" and "boom" in err["message"]
    assert events[-1]["data"] == "[DONE]"


def test_native_generate_stream_and_llama_completion(gw, worker):
    with AutoResponder(worker, lambda job: PIECES) as responder:
        g = httpx.post(gw.url + "/generate", json={"prompt": "To be", "max_new_tokens": 7, "temperature": 0.7,
                                                   "top_k": 50, "top_p": 0.9, "seed": 42}, timeout=30)
        # the TorchWeave seed's curl: -d without a JSON content type, "max_length"
        s = httpx.post(gw.url + "/stream", content=b'{"prompt": "To be", "max_length": 7}', timeout=30,
                       headers={"content-type": "application/x-www-form-urlencoded"})
        c = httpx.post(gw.url + "/completion", json={"prompt": "To be", "n_predict": 7, "stop": ["x"]}, timeout=30)
        cs = httpx.post(gw.url + "/completion", json={"prompt": "To be", "n_predict": 7, "stream": True},
                        timeout=30)
    body = g.json()
    assert g.status_code == 200 and body["text"] == "".join(PIECES) and body["tokens"] == list(range(1, 8))
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 7
    assert body["timings"]["ttft_s"] > 0
    p = responder.jobs[0].params
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (7, 0.7, 50, 0.9, 42)

    events = sse_events(s.text)
    assert events[0]["event"] == "ttft" and float(events[0]["data"]) > 0
    assert "".join(json.loads(e["data"]) for e in events[1:-1]) == "".join(PIECES)
    assert events[-1]["event"] == "done" and json.loads(events[-1]["data"])["usage"]["completion_tokens"] == 7
    assert responder.jobs[1].params.max_tokens == 7

    lc = c.json()
    assert lc["content"] == "".join(PIECES) and lc["stop"] is True and lc["stop_type"] == "limit"
    assert lc["tokens_predicted"] == 7 and lc["tokens_evaluated"] == len(responder.jobs[2].prompt_token_ids)
    assert {"prompt_ms", "predicted_ms", "predicted_per_second"} <= set(lc["timings"])
    assert responder.jobs[2].params.stop == ["x"] and responder.jobs[2].params.temperature == 0.8

    lines = sse_events(cs.text)
    chunks = [json.loads(e["data"]) for e in lines]
    assert all(not ch["stop"] for ch in chunks[:-1]) and chunks[-1]["stop"] is True
    assert "".join(ch["content"] for ch in chunks) == "".join(PIECES)


def test_stop_string_reported_by_llama_completion(gw, worker):
    def respond():
        _entry, job = worker.take_job()
        worker.reply(job, ["To", " be"], "stop", stop_reason="or")

    t = threading.Thread(target=respond)
    t.start()
    r = httpx.post(gw.url + "/completion", json={"prompt": "x", "n_predict": 9, "stop": ["or"]}, timeout=30)
    t.join(10)
    assert r.json()["stop_type"] == "word" and r.json()["stopping_word"] == "or"


def test_x_request_id_is_returned(gw, worker):
    r = httpx.get(gw.url + "/health", headers={"X-Request-ID": "client-id-123"})
    assert r.headers["x-request-id"] == "client-id-123"
    generated = httpx.get(gw.url + "/health").headers["x-request-id"]
    assert generated and generated != "client-id-123"
    bad = httpx.get(gw.url + "/health", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
    assert len(bad) < 100


def test_streaming_disconnect_cancels_the_job(gw, worker, redis_url):
    cancels = CancelListener(redis_url)
    try:
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", gw.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("id: ")  # the role chunk: the job is queued
            _entry, job = worker.take_job()
            worker.publish(gw.gateway_id, [TokenEvent(request_id=job.request_id, seq=0, token_ids=[1], text="a")])
        # leaving the block closed the connection mid-stream
        assert cancels.wait_for(job.request_id)
        assert worker.cancelled(job.request_id)
        ttl = worker.r.ttl(f"spindle:cancelled:{job.request_id}")
        assert 0 < ttl <= gw.settings.request_timeout + 60
    finally:
        cancels.close()


def test_non_streaming_disconnect_cancels_the_job(gw, worker, redis_url):
    cancels = CancelListener(redis_url)
    try:
        def client_that_gives_up():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=1.0)

        t = threading.Thread(target=client_that_gives_up)
        t.start()
        _entry, job = worker.take_job()
        t.join(10)
        assert cancels.wait_for(job.request_id)
        assert worker.cancelled(job.request_id)
    finally:
        cancels.close()


def test_request_timeout_returns_504_and_cancels(redis_url, tiny_artifacts, tmp_path, worker):
    cancels = CancelListener(redis_url)
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, request_timeout=1.0)
    try:
        with running_gateway(settings) as g:
            r = httpx.post(g.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
            assert r.status_code == 504
            assert r.json()["error"]["type"] == "timeout" and "1s" in r.json()["error"]["message"]
            _entry, job = worker.take_job()
            assert cancels.wait_for(job.request_id)
    finally:
        cancels.close()


def test_silent_worker_times_out_the_stream(redis_url, tiny_artifacts, tmp_path, worker):
    """After the first event, EVENT_TIMEOUT bounds the wait for the next one."""
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, event_timeout=0.5)
    with running_gateway(settings) as g:
        def respond():
            _entry, job = worker.take_job()
            worker.publish(g.gateway_id, [TokenEvent(request_id=job.request_id, seq=0, token_ids=[1], text="a")])

        t = threading.Thread(target=respond)
        t.start()
        r = httpx.post(g.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}, timeout=30)
        t.join(10)
    events = sse_events(r.text)
    err = json.loads(events[-2]["data"])["error"]
    assert err["type"] == "timeout" and "No tokens" in err["message"]


def choice_script(job) -> list[str]:
    """Each choice's job answers with its own text: ``<i>a``, ``<i>b`` (i: the choice's index)."""
    i = job.request_id.rsplit("-", 1)[1]
    return [f"{i}a", f"{i}b"]


def test_n_choices_non_streaming(client, worker):
    with AutoResponder(worker, choice_script) as responder:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                           max_tokens=5, temperature=0.9, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == ["0a0b", "1a1b", "2a2b"]
    assert all(c.finish_reason == "stop" for c in r.choices)
    jobs = sorted(responder.jobs, key=lambda j: j.request_id)
    assert [j.request_id for j in jobs] == [f"{r.id}-{i}" for i in range(3)]
    assert [j.params.seed for j in jobs] == [7, 8, 9]  # choice i samples with seed + i
    assert len({tuple(j.prompt_token_ids) for j in jobs}) == 1
    assert r.usage.prompt_tokens == len(jobs[0].prompt_token_ids)  # the prompt counted once
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_n_choices_streaming(client, worker):
    with AutoResponder(worker, choice_script):
        chunks = list(client.completions.create(model=MODEL, prompt="To be", n=2, max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}))
        chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                   max_tokens=5, stream=True))
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "0a0b", 1: "1a1b"} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1
    roles = [c.choices[0].index for c in chat if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    assert {i: "".join(c.choices[0].delta.content or "" for c in chat if c.choices[0].index == i)
            for i in (0, 1)} == {0: "0a0b", 1: "1a1b"}


def test_n_choices_refuse_an_idempotency_key(gw, worker):
    r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "n": 2},
                   headers={"Idempotency-Key": "k-1"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert worker.queued() == 0

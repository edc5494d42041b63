"""The whole system, started as the README does, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import redis

from protocol import keys
from protocol.messages import WorkerInfo
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
MODEL = "tiny-shakespeare"
MODEL_DIR = REPO / "models" / MODEL


@pytest.fixture(scope="module")
def client(system) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.gateway + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def reference_model(system):
    """The bundled model loaded by transformers in the dtype the worker reports it serves in."""
    import torch
    from transformers import AutoModelForCausalLM

    r = redis.Redis.from_url(system.redis_url)
    infos = [WorkerInfo.model_validate_json(r.get(k)) for k in r.scan_iter(keys.WORKER_KEY_PATTERN)]
    dtype = getattr(torch, infos[0].dtype or "float32")
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).eval()


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids


def test_health_and_ready(system):
    assert httpx.get(system.gateway + "/health").status_code == 200
    ready = httpx.get(system.gateway + "/ready")
    assert ready.status_code == 200


def test_chat_non_streaming_usage_matches_tokenizer(client, tokenizer):
    messages = [{"role": "user", "content": "Speak, good sir, what news?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):  # transformers 5 returns a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_chunks(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me of Rome."}], max_tokens=16,
        temperature=0.8, seed=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text.strip()
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= 16
    assert len({c.id for c in chunks}) == 1


def test_greedy_completion_equals_transformers_generate(client, tokenizer, reference_model):
    import torch

    prompt = "ROMEO:\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                       do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert r.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)


def test_completion_streaming_concatenates_to_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="JULIET:\n", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == full


def test_stop_string_is_honoured(client, system):
    kwargs = dict(model=MODEL, prompt="HAMLET:\n", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    words = [w for w in full.split() if len(w) >= 3]
    assert words, f"model produced no words: {full!r}"
    stop = words[len(words) // 2]
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    # The worker says which stop string ended it; llama.cpp's /completion reports it as a "word" stop.
    lc = httpx.post(system.gateway + "/completion", json={"model": MODEL, "prompt": "HAMLET:\n", "n_predict": 30,
                                                          "temperature": 0, "stop": [stop]}, timeout=120).json()
    assert lc["content"] == cut.text
    assert lc["stop_type"] == "word" and lc["stopping_word"] == stop


def test_bad_requests_get_openai_errors(client, system):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=10)
    assert "context" in str(e.value).lower() or "token" in str(e.value).lower()
    r = httpx.post(system.gateway + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    r = httpx.post(system.gateway + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_native_generate_and_llamacpp_completion(system):
    r = httpx.post(system.gateway + "/generate", json={"prompt": "KING:", "max_new_tokens": 8,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    r = httpx.post(system.gateway + "/completion", json={"prompt": "KING:", "n_predict": 8}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["tokens_predicted"] <= 8 and "timings" in body
    with httpx.stream("POST", system.gateway + "/stream", json={"prompt": "KING:", "max_new_tokens": 8},
                      timeout=60) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[0] == "event: ttft" and any(line == "event: done" for line in lines)
    json.loads(lines[1].removeprefix("data:").strip())

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
def served_dtype(system) -> str:
    r = redis.Redis.from_url(system.redis_url)
    infos = [WorkerInfo.model_validate_json(r.get(k)) for k in r.scan_iter(keys.WORKER_KEY_PATTERN)]
    return infos[0].dtype or "float32"


@pytest.fixture(scope="module")
def reference_model():
    """The bundled model loaded by transformers in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype="float32").eval()


def test_greedy_completion_equals_transformers_generate(client, system, tokenizer, reference_model, served_dtype):
    """float32 (the worker's dtype where the CPU lacks native bf16): the text equals ``generate``'s.
    bfloat16: rounding differs from any float32 reference, so every token the system picked must be a
    float32 near-argmax given the same history (see ``greedy_margins``)."""
    import torch

    from tests.unit.test_engine_helpers import greedy_margins

    prompt = "ROMEO:\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if served_dtype == "float32":
        with torch.no_grad():
            out = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                           do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert r.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)
        return
    native = httpx.post(system.gateway + "/generate", json={"model": MODEL, "prompt": prompt, "max_new_tokens": 24,
                                                            "temperature": 0}, timeout=120).json()
    tokens = [t for t in native["tokens"] if t != tokenizer.eos_token_id]
    assert tokenizer.decode(tokens, skip_special_tokens=True) == r.choices[0].text  # the same engine, greedy
    assert len(tokens) > 0 and max(greedy_margins(reference_model, ids[0].tolist(), tokens)) <= 0.15


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


def test_n_choices_with_a_seed_differ_and_reproduce(client):
    """n=3: three jobs, one prompt (computed once per worker, the rest from the prefix cache); with a
    seed, choice i samples with seed + i, so the choices differ and the same request repeats them."""
    kwargs = dict(model=MODEL, prompt="KING HENRY:\n", max_tokens=8, temperature=1.0, seed=11, n=3)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) == 3
    assert 3 <= first.usage.completion_tokens <= 24
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

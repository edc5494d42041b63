"""Random bodies for every generation endpoint: never a 5xx, always the OpenAI error shape on a 4xx.

Hypothesis mixes valid and wrong values per field (wrong types, out of range, odd strings, deep
structures); a worker answers whatever gets queued, so valid requests complete with 200.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.gateway_harness import AutoResponder, FakeWorker, gateway_settings, start_gateway

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)

small_ints = st.integers(-3, 40)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.text(max_size=30) | json_values}), max_size=3)
common = {
    "model": st.sampled_from(["tiny-llama", "no-such", "../x", ""]) | json_values,
    "temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": small_ints | json_values, "seed": st.integers(-(2**64), 2**64) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values, "stream": st.booleans() | json_values,
}
BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries({}, optional={
        **common, "messages": messages | json_values, "max_tokens": small_ints | json_values,
        "n": small_ints, "logprobs": st.booleans() | json_values, "top_logprobs": small_ints | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values}),
    "/v1/completions": st.fixed_dictionaries({}, optional={
        **common, "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 600), max_size=5) | json_values,
        "max_tokens": small_ints | json_values, "echo": st.booleans(), "logprobs": small_ints | json_values}),
    "/generate": st.fixed_dictionaries({}, optional={
        **common, "prompt": st.text(max_size=30) | json_values, "max_new_tokens": small_ints | json_values,
        "max_length": small_ints | json_values}),
    "/completion": st.fixed_dictionaries({}, optional={
        **common, "prompt": st.text(max_size=30) | json_values, "n_predict": small_ints | json_values}),
}


@pytest.fixture(scope="module")
def live(redis_server, tiny_artifacts, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    worker = FakeWorker(redis_server.url)
    worker.heartbeat(ttl=600)
    gw = start_gateway(gateway_settings(redis_server.url, tiny_artifacts, tmp_path_factory.mktemp("fuzz"),
                                        request_timeout=10.0))
    try:
        with AutoResponder(worker, lambda job: ["a", "\n", "b"][: job.params.max_tokens]), httpx.Client(
                base_url=gw.url, timeout=30) as http:
            yield http
    finally:
        gw.stop()


@pytest.mark.parametrize("path", list(BODIES))
def test_random_bodies_never_give_5xx(live, path):
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=BODIES[path])
    def check(body):
        r = live.post(path, json=body)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, r.text

    check()

"""Per-key rate limits (gateway/ratelimit.py): requests and tokens per minute as token buckets in Redis.

Past a limit: 429 ``rate_limit_exceeded`` with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers;
the buckets refill with time (Redis' clock: the tests move a bucket's last update back instead of
waiting a minute, except for one short real wait that checks ``Retry-After`` is enough).
"""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest
import redis

from gateway.ratelimit import go_duration, key_identity, parse_key_limits
from protocol import keys
from tests.integration.gateway_harness import FakeWorker, gateway_settings, running_gateway
from tests.integration.test_gateway_errors import assert_openai_error

COMPLETIONS = "/v1/completions"


@pytest.fixture
def worker(redis_url):
    w = FakeWorker(redis_url)
    w.heartbeat()
    return w


def rewind(redis_url: str, api_key: str, seconds: float) -> None:
    """Make the key's buckets look ``seconds`` older, as if that time had passed."""
    r = redis.Redis.from_url(redis_url)
    key = keys.rate_limit_key(key_identity(api_key))
    ts = float(r.hget(key, "ts"))
    r.hset(key, "ts", str(int(ts - seconds * 1000)))


def body(prompt_tokens: int, max_tokens: int, stream: bool = False) -> dict:
    """A completion reserving exactly ``prompt_tokens + max_tokens`` tokens."""
    return {"prompt": list(range(1, prompt_tokens + 1)), "max_tokens": max_tokens, "stream": stream}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_per_minute(redis_url, tiny_artifacts, tmp_path, worker):
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, api_keys="k1,k2", rate_limit_rpm=3)
    with running_gateway(settings) as g, httpx.Client(base_url=g.url, timeout=30) as http:
        with contextlib.ExitStack() as open_streams:
            for left in (2, 1, 0):
                r = open_streams.enter_context(http.stream("POST", COMPLETIONS, json=body(2, 4, True),
                                                           headers=auth("k1")))
                assert r.status_code == 200
                assert r.headers["x-ratelimit-limit-requests"] == "3"
                assert r.headers["x-ratelimit-remaining-requests"] == str(left)
                assert "x-ratelimit-limit-tokens" not in r.headers  # no token limit configured
            refused = http.post(COMPLETIONS, json=body(2, 4), headers=auth("k1"))
            err = assert_openai_error(refused, 429)
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests", err
            # one request refills in 20 s at 3 per minute
            assert 1 <= int(refused.headers["retry-after"]) <= 20
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
            assert refused.headers["x-ratelimit-limit-requests"] == "3"
            # another key has its own bucket
            with http.stream("POST", COMPLETIONS, json=body(2, 4, True), headers=auth("k2")) as other:
                assert other.status_code == 200
                assert other.headers["x-ratelimit-remaining-requests"] == "2"
            queued = worker.queued()
            rewind(redis_url, "k1", 60)  # a minute later the bucket is full again
            with http.stream("POST", COMPLETIONS, json=body(2, 4, True), headers=auth("k1")) as again:
                assert again.status_code == 200
                assert again.headers["x-ratelimit-remaining-requests"] == "2"
        assert worker.queued() == queued + 1  # the refused request never reached the queue
        metrics = http.get("/metrics").text
    assert 'spindle_admission_rejections_total{reason="rate_limit_requests"} 1.0' in metrics


def test_tokens_per_minute_with_refund_and_per_key_limits(redis_url, tiny_artifacts, tmp_path, worker):
    """k2 has 500 tokens per minute (API_KEY_LIMITS); a request reserves prompt + max_tokens; what a
    finished request did not generate goes back. k3 has 600 (10 per second) for a real wait."""
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, api_keys="k1,k2,k3", rate_limit_rpm=100,
                                api_key_limits="k2:0:500, k3:0:600")
    with running_gateway(settings) as g, httpx.Client(base_url=g.url, timeout=30) as http:
        r = http.post(COMPLETIONS, json=body(4, 506), headers=auth("k2"))  # 510 > 500: can never pass
        err = assert_openai_error(r, 400, "max_tokens")
        assert err["code"] == "exceeds_token_limit" and "500" in err["message"]
        with http.stream("POST", COMPLETIONS, json=body(4, 296, True), headers=auth("k2")) as first:
            assert first.status_code == 200
            assert first.headers["x-ratelimit-limit-tokens"] == "500"
            assert int(first.headers["x-ratelimit-remaining-tokens"]) == 200
            assert "x-ratelimit-limit-requests" not in first.headers  # k2: requests unlimited
            refused = http.post(COMPLETIONS, json=body(4, 296), headers=auth("k2"))
            err = assert_openai_error(refused, 429)
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "tokens", err
            assert 1 <= int(refused.headers["retry-after"]) <= 12  # 100 missing at 500 per minute
            assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 300
            entry_id, job = worker.take_job()
            worker.reply(job, ["a", "b"])  # 2 of 296 generated: 294 come back
            worker.finish(job, entry_id)
            assert first.read()
        deadline = time.monotonic() + 10  # the give-back is a background task of the gateway
        while True:
            with http.stream("POST", COMPLETIONS, json=body(4, 296, True), headers=auth("k2")) as second:
                if second.status_code == 200:
                    break
            assert second.status_code == 429 and time.monotonic() < deadline, "unused tokens never came back"
            time.sleep(0.05)

        with http.stream("POST", COMPLETIONS, json=body(4, 296, True), headers=auth("k3")) as a, \
                http.stream("POST", COMPLETIONS, json=body(4, 296, True), headers=auth("k3")) as b:
            assert a.status_code == b.status_code == 200
            refused = http.post(COMPLETIONS, json=body(4, 6), headers=auth("k3"))
            assert_openai_error(refused, 429)
            wait = int(refused.headers["retry-after"])
            assert wait == 1  # 10 tokens at 10 per second
            time.sleep(wait)
            with http.stream("POST", COMPLETIONS, json=body(4, 6, True), headers=auth("k3")) as c:
                assert c.status_code == 200, "Retry-After was not long enough"
        metrics = http.get("/metrics").text
    assert 'spindle_admission_rejections_total{reason="exceeds_token_limit"} 1.0' in metrics
    refusals = float(metrics.split('spindle_admission_rejections_total{reason="rate_limit_tokens"} ')[1].split()[0])
    assert refusals >= 2  # and one per try while the give-back was on its way


def test_unlimited_by_default_touches_no_bucket(redis_url, tiny_artifacts, tmp_path, worker):
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path)
    with running_gateway(settings) as g, httpx.Client(base_url=g.url, timeout=30) as http, \
            http.stream("POST", COMPLETIONS, json=body(2, 4, True)) as r:
        assert r.status_code == 200
        assert not any(h.startswith("x-ratelimit") for h in r.headers)
    assert not list(redis.Redis.from_url(redis_url).scan_iter(keys.rate_limit_key("*")))


def test_key_limits_parsing_and_reset_format():
    limits = parse_key_limits(" a:b:10:20 , c:0:0,")
    assert limits[key_identity("a:b")].rpm == 10 and limits[key_identity("a:b")].tpm == 20
    assert limits[key_identity("c")].unlimited
    for bad in ("k:1", "k:x:1", ":1:2"):
        with pytest.raises(ValueError):
            parse_key_limits(bad)
    assert [go_duration(ms) for ms in (20, 1000, 2500, 60_000, 90_500)] == ["20ms", "1s", "2.5s", "1m0s", "1m30.5s"]

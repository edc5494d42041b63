"""Metrics after a known workload, through a real worker (paged engine, tiny-llama) and the real gateway.

Prompts are token ids and generation ignores EOS, so every count is known exactly: requests, prompt
and generated tokens, histogram counts (one TTFT/e2e/queue-time per request, one inter-token latency
per token after the first), and even the engine's work (one batch item per token: the prefill that
samples the first token, then one decode per further token).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import redis.asyncio as aioredis

from protocol import keys
from protocol.messages import Job, SamplingParams
from tests.integration.gateway_harness import MODEL
from tests.integration.metrics_stack import eventually, has, observed_stack, value

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]
MAX_TOKENS = [3, 4, 5]


async def test_metric_values_after_a_known_workload(redis_url, tiny_artifacts, tmp_path):
    async with observed_stack(redis_url, tiny_artifacts, tmp_path) as stack:
        url = stack.gateway.url
        body = {"model": MODEL, "temperature": 0, "ignore_eos": True}
        replies = await asyncio.gather(
            stack.http.post(url + "/v1/completions", json={**body, "prompt": PROMPTS[0], "max_tokens": 3}),
            stack.http.post(url + "/v1/completions", json={**body, "prompt": PROMPTS[1], "max_tokens": 4},
                            headers={"X-Request-ID": "client-req-1"}))
        assert [r.status_code for r in replies] == [200, 200]
        assert replies[1].headers["x-request-id"] == "client-req-1"
        assert replies[0].headers["x-request-id"]  # one is made when the client sends none
        async with stack.http.stream("POST", url + "/v1/completions",
                                     json={**body, "prompt": PROMPTS[2], "max_tokens": 5, "stream": True}) as s:
            assert s.status_code == 200
            chunks = [line async for line in s.aiter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]"
        bad = await stack.http.post(url + "/v1/completions", json={**body, "prompt": PROMPTS[0], "max_tokens": -1})
        assert bad.status_code == 400

        n_prompt, n_gen, n_req = sum(map(len, PROMPTS)), sum(MAX_TOKENS), len(PROMPTS)
        wk = await stack.worker_metrics()
        by_model = {"model_name": MODEL}
        assert value(wk, "vllm:prompt_tokens_total", **by_model) == n_prompt
        assert value(wk, "vllm:generation_tokens_total", **by_model) == n_gen
        assert value(wk, "vllm:request_success_total", **by_model, finished_reason="length") == n_req
        for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                     "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                     "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens",
                     "vllm:request_generation_tokens"):
            assert value(wk, hist + "_count", **by_model) == n_req, hist
        assert value(wk, "vllm:inter_token_latency_seconds_count", **by_model) == n_gen - n_req
        assert value(wk, "vllm:request_prompt_tokens_sum", **by_model) == n_prompt
        assert value(wk, "vllm:request_generation_tokens_sum", **by_model) == n_gen
        # One batch item per token: the first comes from the prefill, each other from a decode.
        assert value(wk, "spindle_batch_size_sum", **by_model) == n_gen
        assert value(wk, "spindle_step_seconds_count", **by_model) == value(wk, "spindle_batch_size_count", **by_model)
        assert value(wk, "vllm:prefix_cache_queries_total", **by_model) == n_prompt
        assert value(wk, "vllm:prefix_cache_hits_total", **by_model) == 0
        assert value(wk, "vllm:num_requests_running", **by_model) == 0
        assert value(wk, "vllm:num_requests_waiting", **by_model) == 0
        assert value(wk, "vllm:kv_cache_usage_perc", **by_model) == 0  # every block freed
        assert value(wk, "spindle_worker_jobs", **by_model) == 0
        assert value(wk, "spindle_worker_info", worker_id=stack.worker.id, engine="paged") == 1
        assert value(wk, "spindle_takeovers_total") == 0 and value(wk, "spindle_dead_letters_total") == 0
        assert value(wk, "llm_engine_errors_total") == 0

        gw = await stack.gateway_metrics()
        assert value(gw, "llm_requests_total", endpoint="/v1/completions", status="200") == n_req
        assert value(gw, "llm_requests_total", endpoint="/v1/completions", status="400") == 1
        assert value(gw, "llm_request_duration_seconds_count", endpoint="/v1/completions") == n_req + 1
        assert value(gw, "vllm:prompt_tokens_total", **by_model) == n_prompt
        assert value(gw, "vllm:generation_tokens_total", **by_model) == n_gen
        assert value(gw, "llm_generation_tokens_count", **by_model) == n_req
        assert value(gw, "llm_generation_tokens_sum", **by_model) == n_gen
        assert value(gw, "vllm:time_to_first_token_seconds_count", **by_model) == n_req
        assert value(gw, "vllm:request_success_total", **by_model, finished_reason="length") == n_req
        assert not any('endpoint="/v1/completions?' in line or "/v1/models/" in line for line in gw.splitlines())
        # Sampled from Redis in the background: this worker, an empty queue, Redis up.
        assert value(gw, "spindle_redis_up") == 1
        assert value(gw, "spindle_workers_live") == 1
        assert value(gw, "spindle_workers", **by_model) == 1
        assert value(gw, "spindle_queue_depth", **by_model) == 0
        assert value(gw, "spindle_queue_in_flight", **by_model) == 0


async def test_queue_depth_counts_jobs_no_worker_has_taken(redis_url, tiny_artifacts, tmp_path):
    """Jobs for a model nobody serves wait in its stream: spindle_queue_depth counts them; one taken by a
    consumer (and not finished) moves to spindle_queue_in_flight."""
    async with observed_stack(redis_url, tiny_artifacts, tmp_path) as stack:
        r = aioredis.Redis.from_url(redis_url)
        stream = keys.jobs_stream("nobody-serves-this")
        await r.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
        for i in range(3):
            job = Job(request_id=f"r{i}", gateway_id="gw", model="nobody-serves-this", prompt_token_ids=[1],
                      params=SamplingParams())
            await r.xadd(stream, job.to_fields())

        async def depth(waiting: int, in_flight: int) -> bool:
            text = await stack.gateway_metrics()
            return (value(text, "spindle_queue_depth", model_name="nobody-serves-this") == waiting
                    and value(text, "spindle_queue_in_flight", model_name="nobody-serves-this") == in_flight
                    and has(text, "spindle_queue_depth"))

        await eventually(lambda: depth(3, 0), what="3 queued jobs in spindle_queue_depth")
        await r.xreadgroup(keys.JOBS_GROUP, "someone", {stream: ">"}, count=1)
        await eventually(lambda: depth(2, 1), what="one job in flight")
        text = await stack.gateway_metrics()
        assert value(text, "spindle_workers", model_name="nobody-serves-this") == 0
        assert value(text, "spindle_workers", model_name=MODEL) == 1
        await r.aclose()


# What Prometheus 2.x and 3.x send when they scrape: OpenMetrics first.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


async def test_metrics_endpoints_keep_vllm_names_for_prometheus(redis_url, tiny_artifacts, tmp_path):
    """Scraped as Prometheus scrapes, the names keep their colons (``vllm:...``, not ``vllm_...``)."""
    async with observed_stack(redis_url, tiny_artifacts, tmp_path) as stack:
        for url in (stack.worker_metrics_url, stack.gateway.url + "/metrics"):
            reply = await stack.http.get(url, headers={"Accept": PROMETHEUS_ACCEPT})
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain"), url
            assert "# TYPE vllm:time_to_first_token_seconds histogram" in reply.text, url
            assert "vllm_" not in reply.text, url
        assert (await stack.http.get(stack.worker_metrics_url.replace("/metrics", "/nope"))).status_code == 404
        info = json.loads((await stack.http.get(stack.gateway.url + "/ready")).text)
        assert info["status"] == "ready"
        raw = await aioredis.Redis.from_url(redis_url).get(keys.worker_key(stack.worker.id))
        assert json.loads(raw)["metrics_port"] == int(stack.worker_metrics_url.split(":")[2].split("/")[0])


async def test_redis_up_follows_redis(tiny_artifacts, tmp_path):
    """spindle_redis_up (the SpindleRedisDown alert's input) drops to 0 when Redis goes away."""
    from launcher.redis_server import RedisProcess
    from tests.integration.gateway_harness import gateway_settings, start_gateway

    server = RedisProcess(tmp_path / "redis").start()
    gateway = await asyncio.to_thread(
        start_gateway, gateway_settings(server.url, tiny_artifacts, tmp_path, queue_metrics_interval=0.1))
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            async def redis_up(expected: int) -> bool:
                text = (await http.get(gateway.url + "/metrics")).text
                return has(text, "spindle_redis_up") and value(text, "spindle_redis_up") == expected

            await eventually(lambda: redis_up(1), what="spindle_redis_up 1")
            await asyncio.to_thread(server.stop)
            await eventually(lambda: redis_up(0), what="spindle_redis_up 0 with Redis stopped")
    finally:
        await asyncio.to_thread(gateway.stop)
        server.stop()

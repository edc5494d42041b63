"""The systems compared by ``bench_engine``: each serves a workload's requests as they arrive.

Every runner returns ``(timings, start, end)``: per-request token timestamps (``perf_counter``),
the time the run started (request arrivals are relative to it) and the time it ended. Runners stop
at ``deadline`` (an absolute ``perf_counter`` time): what was produced by then is what counts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from bench.workload import BenchRequest, RequestTiming, Workload

STATIC_BATCH = 32


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _new_timings(wl: Workload, start: float) -> dict[str, RequestTiming]:
    return {r.rid: RequestTiming(r.rid, start + r.arrival, len(r.prompt)) for r in wl.requests}


def load_hf(model_dir: str, dtype: torch.dtype) -> Any:
    """The model for the HF baselines, with EOS switched off (every system ignores EOS)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class StepTimes:
    """A ``generate`` streamer that records when each new token (batch row) arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Deadline:
    """A stopping criterion: stop every row at ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = time.perf_counter() >= self.deadline
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _generate(model: Any, prompts: list[list[int]], max_new_tokens: int, deadline: float) -> list[float]:
    from transformers import StoppingCriteriaList

    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    streamer = StepTimes()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=0, streamer=streamer, stopping_criteria=StoppingCriteriaList([Deadline(deadline)]))
    return streamer.times


def run_hf_sequential(model: Any, wl: Workload, deadline_s: float) -> tuple[list[RequestTiming], float, float]:
    """1. ``generate`` one request at a time, first come first served."""
    start = time.perf_counter()
    deadline = start + deadline_s
    timings = _new_timings(wl, start)
    for r in wl.requests:
        _sleep_until(start + r.arrival)
        if time.perf_counter() >= deadline:
            break
        timings[r.rid].token_times = _generate(model, [r.prompt], r.max_tokens, deadline)[: r.max_tokens]
    return list(timings.values()), start, time.perf_counter()


def run_hf_static(model: Any, wl: Workload, deadline_s: float) -> tuple[list[RequestTiming], float, float]:
    """2. ``generate`` over static batches: take up to 32 waiting requests, pad, run to the longest."""
    start = time.perf_counter()
    deadline = start + deadline_s
    timings = _new_timings(wl, start)
    pending: deque[BenchRequest] = deque(wl.requests)
    while pending and time.perf_counter() < deadline:
        now = time.perf_counter()
        if start + pending[0].arrival > now:
            _sleep_until(start + pending[0].arrival)
            continue
        batch = []
        while pending and len(batch) < STATIC_BATCH and start + pending[0].arrival <= now:
            batch.append(pending.popleft())
        times = _generate(model, [r.prompt for r in batch], max(r.max_tokens for r in batch), deadline)
        for r in batch:
            timings[r.rid].token_times = times[: r.max_tokens]
    return list(timings.values()), start, time.perf_counter()


def run_hf_continuous(model: Any, wl: Workload, deadline_s: float, kv_bytes: int = 512 * 1024**2,
                      max_batch: int = 32, max_batch_tokens: int = 512) -> tuple[list[RequestTiming], float, float]:
    """3. transformers' built-in continuous batching (``ContinuousBatchingManager``), given the same
    KV memory, batch size and per-step token budget as the engine (left alone it sizes its cache
    from free memory: gigabytes on a CPU host)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from worker.engine.model_runner import kv_bytes_per_block

    page = 256
    per_token = kv_bytes_per_block(model.config, 1, model.dtype)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=max(4, kv_bytes // (per_token * page)),
                                  max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_batch)
    gc = GenerationConfig(max_new_tokens=max(r.max_tokens for r in wl.requests), do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    try:  # warm-up, not timed
        manager.add_request([1, 2, 3, 4], request_id="warmup", max_new_tokens=4, eos_token_id=-1)
        manager.get_result(request_id="warmup", timeout=120)
        start = time.perf_counter()
        deadline = start + deadline_s
        timings = _new_timings(wl, start)

        def submit() -> None:
            for r in wl.requests:
                _sleep_until(start + r.arrival)
                if time.perf_counter() >= deadline:
                    return
                manager.add_request(r.prompt, request_id=r.rid, max_new_tokens=r.max_tokens,
                                    record_timestamps=True, eos_token_id=-1)

        driver = threading.Thread(target=submit, daemon=True)
        driver.start()
        done = 0
        while done < len(wl.requests) and time.perf_counter() < deadline:
            out = manager.get_result(timeout=min(1.0, max(0.01, deadline - time.perf_counter())))
            if out is None or out.request_id not in timings:
                continue
            timings[out.request_id].token_times = list(out.timestamps or [])
            done += 1
        end = time.perf_counter()
        driver.join(timeout=1)
    finally:
        manager.stop(block=True, timeout=30)
    return list(timings.values()), start, end


def run_engine(build: Any, wl: Workload, deadline_s: float) -> tuple[list[RequestTiming], float, float]:
    """4. This engine in-process, built by ``build()`` on its own thread and stepped there (as the worker
    runs it: one thread does all of its torch work, see worker/engine/engine_thread.py)."""
    from protocol.messages import SamplingParams
    from worker.engine.api import EngineRequest
    from worker.engine.engine_thread import EngineThread

    finished: set[str] = set()
    all_done = threading.Event()
    timings: dict[str, RequestTiming] = {}

    def on_outputs(outputs: list[Any]) -> None:
        now = time.perf_counter()
        for o in outputs:
            t = timings.get(o.request_id)
            if t is not None:
                t.token_times.extend([now] * len(o.new_token_ids))
            if o.finish_reason:
                finished.add(o.request_id)
        if len(finished) >= len(wl.requests):
            all_done.set()

    thread = EngineThread.launch(build, on_outputs)
    thread.wait_ready()
    try:
        warm = threading.Event()
        thread.on_outputs = lambda outs: warm.set() if any(o.finish_reason for o in outs) else None
        thread.add_request(EngineRequest("warmup", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4,
                                                                                ignore_eos=True)))
        warm.wait(120)
        thread.on_outputs = on_outputs
        start = time.perf_counter()
        deadline = start + deadline_s
        timings.update(_new_timings(wl, start))
        for r in wl.requests:
            _sleep_until(start + r.arrival)
            if time.perf_counter() >= deadline:
                break
            thread.add_request(EngineRequest(r.rid, r.prompt, SamplingParams(
                temperature=0, max_tokens=r.max_tokens, ignore_eos=True)))
        all_done.wait(max(0.0, deadline - time.perf_counter()))
        end = time.perf_counter()
    finally:
        for r in wl.requests:
            thread.cancel(r.rid)
        thread.stop()
    return list(timings.values()), start, end


def batch1_hf(model: Any, prompt_len: int = 32, new_tokens: int = 128) -> float:
    """Decode tokens/s of ``generate`` at batch 1 (after the first token)."""
    prompt = list(range(1, prompt_len + 1))
    _generate(model, [prompt], 8, time.perf_counter() + 600)  # warm-up
    times = _generate(model, [prompt], new_tokens, time.perf_counter() + 600)
    return (len(times) - 1) / (times[-1] - times[0])


def batch1_engine(engine: Any, prompt_len: int = 32, new_tokens: int = 128) -> float:
    from protocol.messages import SamplingParams
    from worker.engine.api import EngineRequest

    def run(rid: str, n: int) -> list[float]:
        engine.add_request(EngineRequest(rid, list(range(1, prompt_len + 1)),
                                         SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)))
        times = []
        while engine.has_work():
            if any(o.new_token_ids for o in engine.step()):
                times.append(time.perf_counter())
        return times

    run("warm", 8)
    times = run("b1", new_tokens)
    return (len(times) - 1) / (times[-1] - times[0])


def run_http(model_dir: str, wl: Workload, deadline_s: float, worker_env: dict[str, str]
             ) -> tuple[list[RequestTiming], float, float, int]:
    """5. The whole system over HTTP: redis-server, one gateway and one worker (the paged engine) as
    local processes; one streaming client per request, sent at its arrival time.

    The clients use the llama.cpp-compatible ``POST /completion`` stream because its chunks carry the
    token ids they deliver, so every token is timed when the client receives it (an OpenAI chunk
    says nothing of tokens whose text the detokenizer held back). Also returns the fleet's peak RSS
    (gateway + worker + Redis, sampled every 0.2 s), which is what serving costs in memory.
    """
    import asyncio
    import json
    import tempfile
    from pathlib import Path

    import httpx

    from bench.fleet import Fleet

    model = Path(model_dir)
    root = Path(tempfile.mkdtemp(prefix="spindle-bench-http-"))
    fleet = Fleet(root, model.parent, model.name, worker_env=worker_env,
                  gateway_env={"REQUEST_TIMEOUT": str(deadline_s + 120), "EVENT_TIMEOUT": "600"})
    peak_rss = 0

    async def one(client: httpx.AsyncClient, url: str, r: BenchRequest, t: RequestTiming | None) -> None:
        body = {"prompt": r.prompt, "n_predict": r.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", url + "/completion", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{r.rid}: HTTP {resp.status_code} {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if t is not None and chunk.get("tokens"):
                    t.token_times.extend([time.perf_counter()] * len(chunk["tokens"]))
                if "error" in chunk:
                    raise RuntimeError(f"{r.rid}: {chunk['error']}")

    async def drive() -> tuple[dict[str, RequestTiming], float, float]:
        nonlocal peak_rss
        url = fleet.gateways[0][0]
        limits = httpx.Limits(max_connections=len(wl.requests) + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s + 300, connect=30), limits=limits) as client:
            await one(client, url, BenchRequest("warmup", 0.0, [1, 2, 3, 4], 4), None)
            start = time.perf_counter()
            deadline = start + deadline_s
            timings = _new_timings(wl, start)

            async def scheduled(r: BenchRequest) -> None:
                await asyncio.sleep(max(0.0, start + r.arrival - time.perf_counter()))
                if time.perf_counter() < deadline:
                    await one(client, url, r, timings[r.rid])

            async def sample_rss() -> None:
                nonlocal peak_rss
                while True:
                    peak_rss = max(peak_rss, fleet.rss_bytes())
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample_rss())
            tasks = [asyncio.create_task(scheduled(r)) for r in wl.requests]
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
            end = time.perf_counter()
            for task in tasks:
                task.cancel()  # a client hanging up cancels its job
            await asyncio.gather(*tasks, return_exceptions=True)
            sampler.cancel()
            failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
            if failed:
                raise failed[0]
            return timings, start, end

    try:
        fleet.scale_workers(1, timeout=600)
        fleet.scale_gateways(1)
        timings, start, end = asyncio.run(drive())
    finally:
        fleet.close()
    return list(timings.values()), start, end, peak_rss

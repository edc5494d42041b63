"""The benchmark's workload (seeded) and the per-request timing it is scored on."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field


@dataclass
class BenchRequest:
    rid: str
    arrival: float  # seconds after the start of the run
    prompt: list[int]
    max_tokens: int


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]

    def describe(self) -> dict:
        p = [len(r.prompt) for r in self.requests]
        o = [r.max_tokens for r in self.requests]
        return {"name": self.name, "requests": len(self.requests), "prompt_tokens": sum(p),
                "output_tokens": sum(o), "prompt_len_range": [min(p), max(p)],
                "output_len_range": [min(o), max(o)], "last_arrival_s": round(self.requests[-1].arrival, 2)}


def make_workload(name: str = "mixed", n: int = 64, rate: float = 8.0, prompt_range: tuple[int, int] = (16, 256),
                  output_range: tuple[int, int] = (16, 256), long_fraction: float = 0.0,
                  long_range: tuple[int, int] = (1024, 2048), vocab: int = 49152, seed: int = 0) -> Workload:
    """``n`` requests with Poisson arrivals at ``rate`` per second, uniform prompt/output lengths;
    a ``long_fraction`` of the prompts drawn from ``long_range`` instead."""
    rng = random.Random(seed)
    t = 0.0
    reqs = []
    for i in range(n):
        t += rng.expovariate(rate)
        lo, hi = long_range if rng.random() < long_fraction else prompt_range
        plen = rng.randint(lo, hi)
        prompt = [rng.randrange(1, vocab) for _ in range(plen)]
        reqs.append(BenchRequest(f"req-{i}", t, prompt, rng.randint(*output_range)))
    return Workload(name, reqs)


@dataclass
class RequestTiming:
    rid: str
    arrival: float  # absolute perf_counter time the request became available
    prompt_len: int
    token_times: list[float] = field(default_factory=list)  # absolute perf_counter time of each token

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(timings: list[RequestTiming], start: float, end: float, expected_requests: int,
              long_threshold: int = 1024) -> dict:
    """Throughput and latency figures for one system on one workload."""
    tokens = sum(len(t.token_times) for t in timings)
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    itls = [x for t in timings for x in t.itls()]
    short_itls = [x for t in timings if t.prompt_len < long_threshold for x in t.itls()]
    elapsed = end - start
    done = sum(1 for t in timings if t.token_times)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "output_tokens": tokens,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "requests_started": done,
        "requests_expected": expected_requests,
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(itls, 50)), "itl_p99_ms": ms(percentile(itls, 99)),
        "itl_short_prompts_p99_ms": ms(percentile(short_itls, 99)),
    }


def timings_to_json(timings: list[RequestTiming]) -> list[dict]:
    return [asdict(t) for t in timings]

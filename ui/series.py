"""Throughput and time-to-first-token over the last minutes, from the gateway's Prometheus counters.

The gateway exports cumulative counters and histograms (vLLM's names). ``parse`` turns one scrape into
per-model totals; ``History`` keeps a bounded ring of timestamped scrapes (one per ``min_interval``, shared
by every browser session of the UI process) and ``History.rates`` turns consecutive scrapes into rates:
generated tokens/s, finished requests/s and the mean TTFT of the requests that got their first token in
that interval. A counter that went down (the gateway restarted) starts a new baseline instead of a
negative rate.

The history begins when the UI first shows the System page and lives in the UI process; for long-term
history use Prometheus and Grafana (``deploy/``).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

GEN_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
SUCCESS = "vllm:request_success_total"
TTFT = "vllm:time_to_first_token_seconds"


@dataclass
class ModelTotals:
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    requests: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count


@dataclass
class Scrape:
    at: float  # time.time()
    models: dict[str, ModelTotals]


def parse(text: str, at: float | None = None) -> Scrape:
    """Per-model totals from Prometheus text; unknown or malformed families are ignored."""
    models: dict[str, ModelTotals] = {}

    def totals(labels: dict[str, str]) -> ModelTotals:
        return models.setdefault(labels.get("model_name", "?"), ModelTotals())

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == GEN_TOKENS:
                totals(s.labels).generation_tokens += s.value
            elif s.name == PROMPT_TOKENS:
                totals(s.labels).prompt_tokens += s.value
            elif s.name == SUCCESS:
                totals(s.labels).requests += s.value
            elif s.name == TTFT + "_sum":
                totals(s.labels).ttft_sum += s.value
            elif s.name == TTFT + "_count":
                totals(s.labels).ttft_count += s.value
            elif s.name == TTFT + "_bucket":
                le = float(s.labels.get("le", "+Inf"))
                t = totals(s.labels)
                t.ttft_buckets[le] = t.ttft_buckets.get(le, 0.0) + s.value
    return Scrape(time.time() if at is None else at, models)


@dataclass
class Rate:
    at: float  # end of the interval
    model: str
    tokens_per_s: float
    requests_per_s: float
    ttft_mean_s: float | None  # None when no request got its first token in the interval


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative bucket counts (linear inside a bucket)."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


class History:
    """A bounded, thread-safe ring of scrapes (Streamlit sessions run on threads of one process)."""

    def __init__(self, window_s: float = 600.0, min_interval: float = 1.0, max_samples: int = 1200):
        self.window_s = window_s
        self.min_interval = min_interval
        self._samples: deque[Scrape] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            return not self._samples or now - self._samples[-1].at >= self.min_interval

    def add(self, scrape: Scrape) -> bool:
        """Keep ``scrape`` unless the last one is younger than ``min_interval``; drop what left the window."""
        with self._lock:
            if self._samples and scrape.at - self._samples[-1].at < self.min_interval:
                return False
            self._samples.append(scrape)
            while self._samples and scrape.at - self._samples[0].at > self.window_s:
                self._samples.popleft()
            return True

    def samples(self) -> list[Scrape]:
        with self._lock:
            return list(self._samples)

    def rates(self) -> list[Rate]:
        out: list[Rate] = []
        samples = self.samples()
        for a, b in itertools.pairwise(samples):
            dt = b.at - a.at
            if dt <= 0:
                continue
            for model, tb in b.models.items():
                ta = a.models.get(model, ModelTotals())
                d_tok = tb.generation_tokens - ta.generation_tokens
                d_req = tb.requests - ta.requests
                d_sum, d_cnt = tb.ttft_sum - ta.ttft_sum, tb.ttft_count - ta.ttft_count
                if d_tok < 0 or d_req < 0 or d_cnt < 0:  # counters reset: the gateway restarted
                    continue
                out.append(Rate(b.at, model, d_tok / dt, d_req / dt, d_sum / d_cnt if d_cnt > 0 else None))
        return out

    def window_ttft_quantile(self, q: float, model: str) -> float | None:
        """TTFT quantile of the requests seen inside the window (bucket deltas first -> last scrape)."""
        samples = self.samples()
        if len(samples) < 2:
            return None
        first, last = samples[0].models.get(model, ModelTotals()), samples[-1].models.get(model)
        if last is None:
            return None
        delta = {le: c - first.ttft_buckets.get(le, 0.0) for le, c in last.ttft_buckets.items()}
        if any(v < 0 for v in delta.values()):
            return None
        return quantile(q, delta)

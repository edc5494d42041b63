"""For the alert and dashboard tests: every metric name the services export, the metric names a PromQL
expression reads, and promtool (from PATH or .cache/prometheus, where scripts/install-test-tools.sh
unpacks it)."""

from __future__ import annotations

import re
import shutil
import uuid
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from protocol.settings import REPO_ROOT

PROMTOOL_HINT = ("promtool is not installed: scripts/install-test-tools.sh unpacks it from Debian's prometheus "
                 "package into .cache/prometheus (as root)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("_count", "_sum", "_created"), "gauge": (), "info": ("_info",), "unknown": ()}
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "vector",
    "scalar", "abs", "absent", "absent_over_time", "clamp_min", "clamp_max", "label_replace", "label_join",
    "time", "timestamp", "sort", "sort_desc", "round", "ceil", "floor", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "count_over_time", "last_over_time", "predict_linear", "changes",
    "resets", "inf", "nan", "label_values", "e",
}


def registries() -> dict[str, CollectorRegistry]:
    """Each service's real registry (nothing is scraped; families without samples still have names)."""
    from gateway.metrics import GatewayMetrics
    from model_manager.metrics import Metrics as ManagerMetrics
    from protocol.settings import WorkerSettings
    from worker.service import Worker

    worker = Worker(WorkerSettings(worker_id=f"wk-names-{uuid.uuid4().hex[:6]}"))
    return {"gateway": GatewayMetrics().registry, "worker": worker.metrics.registry,
            "model-manager": ManagerMetrics().registry}


@cache
def exported() -> dict[str, frozenset[str]]:
    """service -> every sample name it can expose (``vllm:prompt_tokens_total``, ``..._bucket``, ...)."""
    out: dict[str, frozenset[str]] = {}
    for service, registry in registries().items():
        names: set[str] = set()
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
            names.update(s.name for s in family.samples)
        out[service] = frozenset(names)
    return out


def all_exported() -> set[str]:
    return set().union(*exported().values()) | PROMETHEUS_OWN


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\w+|\$\{\w+\}", " ", text)  # Grafana variables outside selectors
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if word.lower() in FUNCTIONS_AND_KEYWORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or word[0].isdigit():
            continue
        names.add(word)
    return names


def promtool() -> str:
    for candidate in (shutil.which("promtool"), REPO_ROOT / ".cache/prometheus/usr/bin/promtool"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip(PROMTOOL_HINT)

"""Prometheus metrics for ``GET /metrics``, read from Redis at scrape time.

The jobs run in another process (the rq worker), so their counters live in Redis
(``keys.MANAGER_STATS_KEY``) and this collector turns a snapshot of them into metrics:

- ``spindle_manager_jobs_total{kind,state}``: jobs by kind (pull, import, optimize) and state
  (queued = enqueued, started, finished, failed), counted since Redis was last emptied;
- ``spindle_manager_download_bytes_total``: bytes received from the Hub;
- ``spindle_manager_queue_jobs{registry}``: jobs now queued / started / finished / failed in rq;
- ``spindle_manager_models``, ``spindle_manager_disk_free_bytes``, ``spindle_manager_disk_total_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        jobs = CounterMetricFamily("spindle_manager_jobs", "Model jobs by kind and state", labels=["kind", "state"])
        for field, value in sorted(s.get("stats", {}).items()):
            parts = field.split(":")
            if len(parts) == 3 and parts[0] == "jobs":
                jobs.add_metric([parts[1], parts[2]], value)
        yield jobs
        dl = CounterMetricFamily("spindle_manager_download_bytes", "Bytes downloaded from the model hub")
        dl.add_metric([], s.get("stats", {}).get("download_bytes", 0))
        yield dl
        queue = GaugeMetricFamily("spindle_manager_queue_jobs", "Jobs in each rq registry", labels=["registry"])
        for reg, value in sorted(s.get("counts", {}).items()):
            queue.add_metric([reg], value)
        yield queue
        yield GaugeMetricFamily("spindle_manager_models", "Models in the artifact volume", value=s.get("models", 0))
        yield GaugeMetricFamily("spindle_manager_disk_free_bytes", "Free bytes on the artifact volume",
                                value=s.get("disk_free", 0))
        yield GaugeMetricFamily("spindle_manager_disk_total_bytes", "Size of the artifact volume",
                                value=s.get("disk_total", 0))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SnapshotCollector()
        self.registry.register(self.collector)

    def render(self, snapshot: dict[str, Any]) -> bytes:
        self.collector.snapshot = snapshot
        return generate_latest(self.registry)

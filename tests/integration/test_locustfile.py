"""``deploy/load/locustfile.py`` runs: a few seconds of locust (headless, its own process: locust
monkey-patches the interpreter with gevent) against a real gateway answered by a ``FakeWorker``.
Skipped only when locust is not installed (the ``load`` extra; ``dev`` includes it)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.gateway_harness import AutoResponder, FakeWorker, gateway_settings, running_gateway

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")


def test_locustfile_drives_streaming_and_non_streaming_chat(redis_url, tiny_artifacts, tmp_path):
    worker = FakeWorker(redis_url)
    worker.heartbeat()
    settings = gateway_settings(redis_url, tiny_artifacts, tmp_path, api_keys="load-key")
    env = {**os.environ, "SPINDLE_API_KEY": "load-key", "SPINDLE_MODEL": "tiny-llama", "SPINDLE_MAX_TOKENS": "8",
           "SPINDLE_WAIT": "0.02,0.05", "SPINDLE_PROMPT_WORDS": "4,20,60"}
    with running_gateway(settings) as g, AutoResponder(worker, lambda job: ["a", "b", "c"]):
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "deploy/load/locustfile.py"), "--headless",
             "--host", g.url, "-u", "3", "-r", "3", "-t", "4s", "--csv", str(tmp_path / "run"), "--only-summary"],
            env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("chat", "chat stream", "TTFT chat stream", "TPOT chat stream"):
        assert int(rows[name]["Request Count"]) > 0, (name, rows.keys())
    assert int(rows["Aggregated"]["Failure Count"]) == 0

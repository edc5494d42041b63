"""Local processes for the benchmarks that go over HTTP: one redis-server, gateways and workers.

``Fleet(root, artifacts, model, worker_env)`` starts nothing until asked: ``scale_workers(n)`` and
``scale_gateways(n)`` start processes (niced, logs in ``root``) and wait until they are live
(a worker's heartbeat key in Redis; a gateway's ``/ready``). ``close()`` stops them all.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import redis

from launcher.redis_server import RedisProcess, free_port
from protocol import keys

REPO = Path(__file__).resolve().parent.parent
NICE = 10


class Fleet:
    """Redis, the gateways and the workers, started niced with their logs in ``root``."""

    def __init__(self, root: Path, artifacts: Path, model: str, worker_env: dict[str, str] | None = None,
                 gateway_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.artifacts = artifacts
        self.model = model
        self.worker_env = worker_env or {}
        self.gateway_env = gateway_env or {}
        self.redis = RedisProcess(root / "redis").start()
        self.redis_proc = psutil.Process(self.redis.proc.pid)
        self.gateways: list[tuple[str, subprocess.Popen]] = []
        self.workers: list[subprocess.Popen] = []
        self.client = redis.Redis.from_url(self.redis.url)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"API_KEYS", "WORKER_MODELS", "WORKER_ID"}}
        env.update({"REDIS_URL": self.redis.url, "ARTIFACTS_DIR": str(self.artifacts), "DEFAULT_MODEL": self.model,
                    "LOG_FORMAT": "text", "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}, **extra)
        return env

    def _start(self, name: str, module: str, env: dict[str, str]) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("w") as log:
            return subprocess.Popen(["nice", "-n", str(NICE), sys.executable, "-m", module], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def scale_workers(self, n: int, timeout: float = 180) -> None:
        while len(self.workers) < n:
            i = len(self.workers)
            self.workers.append(self._start(f"worker{i}", "worker", self._env(
                WORKER_ID=f"wk-bench-{i}", WORKER_METRICS_PORT="0", **self.worker_env)))
        deadline = time.monotonic() + timeout
        while len(list(self.client.scan_iter(keys.WORKER_KEY_PATTERN))) < n:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers after {timeout}s (logs in {self.root})")
            time.sleep(0.2)

    def scale_gateways(self, n: int, timeout: float = 180) -> None:
        while len(self.gateways) < n:
            port = free_port()
            proc = self._start(f"gateway{len(self.gateways)}", "gateway", self._env(
                GATEWAY_PORT=str(port), **{"QUEUE_CAPACITY": "4096", "QUEUE_METRICS_INTERVAL": "0",
                                           **self.gateway_env}))
            self.gateways.append((f"http://127.0.0.1:{port}", proc))
        deadline = time.monotonic() + timeout
        for url, _ in self.gateways:
            while True:
                self._check_alive()
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway {url} not ready after {timeout}s (logs in {self.root})")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        for proc in [p for _, p in self.gateways] + self.workers:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode} (logs in {self.root})")

    def pids(self) -> dict[str, list[int]]:
        return {"gateways": [p.pid for _, p in self.gateways], "workers": [p.pid for p in self.workers],
                "redis": [self.redis_proc.pid]}

    def rss_bytes(self) -> int:
        """Resident memory of all the fleet's processes now."""
        total = 0
        for pids in self.pids().values():
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
        return total

    def cpu_seconds(self) -> dict[tuple[str, int], float]:
        """CPU-seconds used so far by each of our processes (and this one), keyed (component, pid)."""
        def cpu(pid: int) -> float:
            t = psutil.Process(pid).cpu_times()
            return t.user + t.system

        out = {(component, pid): cpu(pid) for component, pids in self.pids().items() for pid in pids}
        out[("load generator", os.getpid())] = cpu(os.getpid())
        return out

    def close(self) -> None:
        procs = [p for _, p in self.gateways] + self.workers
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()

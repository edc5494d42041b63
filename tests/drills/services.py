"""A gateway and workers as separate processes (``python -m gateway``, ``python -m worker``) on the test
session's Redis, for drills that signal or measure one process (``spindle up`` hides them behind the
launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from launcher.redis_server import free_port
from protocol import keys
from tests.conftest import REPO
from tests.drills.conftest import DRILL_MODEL


@dataclass
class Service:
    proc: subprocess.Popen
    log: Path
    url: str = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def service_env(redis_url: str, artifacts: Path, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GATEWAY_", "API_"))}
    env.update({"REDIS_URL": redis_url, "ARTIFACTS_DIR": str(artifacts), "BUNDLED_MODELS_DIR": str(tmp / "none"),
                "DEFAULT_MODEL": DRILL_MODEL, "LOG_FORMAT": "text", "TORCH_THREADS": "1",
                "WORKER_METRICS_PORT": "0", "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3"})
    env.update(extra)
    return env


def start(module: str, env: dict[str, str], log: Path) -> Service:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return Service(proc, log)


def _wait(what: str, done, service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {service.proc.returncode}:\n"
                               f"{service.log_text()[-3000:]}")
        try:
            if done():
                return
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.2)
    service.stop(5)
    raise TimeoutError(f"{what} within {timeout}s:\n{service.log_text()[-3000:]}")


def start_worker(env: dict[str, str], log: Path, timeout: float = 120) -> Service:
    """A worker, returned once its heartbeat is in Redis."""
    worker_id = f"wk-drill-{os.urandom(3).hex()}"
    w = start("worker", {**env, "WORKER_ID": worker_id}, log)
    r = redis.Redis.from_url(env["REDIS_URL"])
    _wait("no worker heartbeat", lambda: r.exists(keys.worker_key(worker_id)), w, timeout)
    return w


def start_gateway(env: dict[str, str], log: Path, timeout: float = 120) -> Service:
    """A gateway on a free port, returned once ``/ready`` says 200 (so a worker must be up)."""
    port = free_port()
    g = start("gateway", {**env, "GATEWAY_PORT": str(port)}, log)
    g.url = f"http://127.0.0.1:{port}"
    _wait("gateway not ready", lambda: httpx.get(g.url + "/ready", timeout=2).status_code == 200, g, timeout)
    return g

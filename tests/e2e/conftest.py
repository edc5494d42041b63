"""Starts the whole system the way the README does (``spindle up``) on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.redis_server import free_port
from tests.conftest import REPO


@dataclass
class System:
    proc: subprocess.Popen
    gateway: str
    manager: str
    ui: str
    redis_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_system(tmp: Path, extra_env: dict[str, str] | None = None, timeout: float = 240) -> System:
    ports = {k: free_port() for k in ("GATEWAY_PORT", "MANAGER_PORT", "UI_PORT", "EMBEDDED_REDIS_PORT")}
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"STATE_DIR": str(tmp / "state"), "ARTIFACTS_DIR": str(tmp / "artifacts"),
                "WORKER_METRICS_PORT_BASE": "0", "LOG_FORMAT": "text", "SHUTDOWN_GRACE": "20",
                "DRAIN_TIMEOUT": "5", "TORCH_THREADS": "1"})
    env.update(extra_env or {})
    log = tmp / "spindle.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--ready-timeout", str(timeout)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    system = System(proc, f"http://127.0.0.1:{ports['GATEWAY_PORT']}",
                    f"http://127.0.0.1:{ports['MANAGER_PORT']}", f"http://127.0.0.1:{ports['UI_PORT']}",
                    f"redis://127.0.0.1:{ports['EMBEDDED_REDIS_PORT']}/0", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"spindle up exited with {proc.returncode}:\n{system.log_text()[-4000:]}")
        try:
            if httpx.get(system.gateway + "/ready", timeout=2).status_code == 200:
                return system
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_system(system)
    raise TimeoutError(f"system not ready in {timeout}s:\n{system.log_text()[-4000:]}")


def stop_system(system: System, timeout: float = 60) -> int:
    children = psutil.Process(system.proc.pid).children(recursive=True) if system.proc.poll() is None else []
    system.proc.send_signal(signal.SIGTERM)
    code = system.proc.wait(timeout)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphan processes after shutdown: {alive}"
    return code


@pytest.fixture(scope="session")
def system(tmp_path_factory) -> Iterator[System]:
    s = start_system(tmp_path_factory.mktemp("system"))
    yield s
    code = stop_system(s)
    assert code == 0, s.log_text()[-3000:]

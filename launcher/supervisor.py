"""Supervised child processes with prefixed logs, restarts with backoff and clean shutdown.

Children get SIGTERM in reverse start order on Ctrl-C/SIGTERM, then SIGKILL after the grace period.
Each child also gets PR_SET_PDEATHSIG, so even a ``kill -9`` of the launcher leaves no orphans.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m", "\033[96m", "\033[93m"]
RESET = "\033[0m"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # own process group: the terminal's Ctrl-C reaches only the launcher


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = True
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    color: str = ""
    pump: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, out=None, color: bool | None = None):
        self.children: list[Child] = []
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.stopping = False
        self._lock = threading.Lock()

    def log(self, name: str, line: str, color: str = "") -> None:
        width = max((len(c.name) for c in self.children), default=8)
        prefix = f"{name:<{width}} | "
        if self.color and color:
            prefix = f"{color}{prefix}{RESET}"
        with self._lock:
            self.out.write(prefix + line.rstrip("\n") + "\n")
            self.out.flush()

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None, restart: bool = True) -> Child:
        child = Child(name, argv, {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}, restart,
                      color=COLORS[len(self.children) % len(COLORS)])
        self.children.append(child)
        return child

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=child.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent, text=True, errors="replace")
        child.started_at = time.monotonic()
        child.pump = threading.Thread(target=self._pump, args=(child, child.proc), daemon=True)
        child.pump.start()
        self.log(child.name, f"started (pid {child.proc.pid}): {' '.join(child.argv)}", child.color)

    def _pump(self, child: Child, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log(child.name, line, child.color)

    def start_all(self) -> None:
        for c in self.children:
            self.start(c)

    def watch(self, stop: threading.Event) -> None:
        """Restart children that die (backoff 1, 2, 4 .. 30 s) until ``stop`` is set."""
        while not stop.wait(0.5):
            for c in self.children:
                if c.proc is None or c.proc.poll() is None or self.stopping:
                    continue
                code = c.proc.returncode
                if not c.restart:
                    self.log(c.name, f"exited with {code}; not restarting", c.color)
                    c.proc = None
                    continue
                if time.monotonic() - c.started_at > 60:
                    c.restarts = 0
                delay = min(30.0, 2.0 ** c.restarts)
                self.log(c.name, f"exited with {code}; restarting in {delay:.0f}s", c.color)
                c.restarts += 1
                if stop.wait(delay):
                    return
                self.start(c)

    def stop_all(self, grace: float, last: tuple[str, ...] = ("redis",)) -> None:
        """SIGTERM every service at once (they drain in parallel), then the ones in ``last`` (Redis)."""
        self.stopping = True
        first = [c for c in self.children if c.name not in last]
        for group in (first, [c for c in self.children if c.name in last]):
            running = [c for c in group if c.proc and c.proc.poll() is None]
            for c in running:
                self.log(c.name, "stopping", c.color)
                c.proc.terminate()
            deadline = time.monotonic() + grace
            for c in running:
                self._wait(c, max(0.1, deadline - time.monotonic()))
        for c in self.children:
            if c.pump:
                c.pump.join(1)

    def _wait(self, c: Child, grace: float) -> None:
        assert c.proc is not None
        try:
            c.proc.wait(grace)
            self.log(c.name, f"stopped ({c.proc.returncode})", c.color)
        except subprocess.TimeoutExpired:
            self.log(c.name, f"did not stop within {grace:.0f}s; killing", c.color)
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()

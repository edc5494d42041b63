"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs on a bridge.

Each host is a network namespace with one interface, ``eth0``, and its own address on a private /24;
the other end of its veth pair is plugged into a bridge in the test's own namespace, which also gets
an address, so the test reaches every host as a client on the same LAN would. Processes are started
inside a host with ``ip netns exec``. ``cut(host)`` takes the host's cable out of the switch (the
bridge-side end goes down): its processes keep running but can no longer reach anyone; ``heal(host)``
plugs it back in.

Everything is created with names unique to this test run and removed by ``close()``.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def namespaces_permitted() -> tuple[bool, str]:
    """Whether this process may create network namespaces (tried for real), and why not."""
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    probe = f"spindle-probe-{os.getpid()}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return False, f"`ip netns add` is not permitted here ({res.stderr.strip() or res.returncode}); " \
                      "the test needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no route on this machine already covers."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    used = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word.startswith(("local", "broadcast")) and len(line.split()) > 1:
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 in 10.0.0.0/8")


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    bridge_end: str  # the veth end plugged into the bridge (in the test's namespace)
    procs: list[subprocess.Popen] = field(default_factory=list)


class Network:
    """A bridge and the hosts plugged into it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = _free_subnet()
        addresses = self.subnet.hosts()
        self.gateway_ip = str(next(addresses))
        self._addresses = addresses
        self.bridge = f"spbr{self.tag}"
        self.hosts: list[Host] = []
        self.cut_off: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        i = len(self.hosts)
        host = Host(name, f"spindle-{self.tag}-{name}", str(next(self._addresses)), f"sph{self.tag}{i}")
        self.hosts.append(host)  # before anything can fail, so close() removes what was made
        inner = f"spn{self.tag}{i}"
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.bridge_end, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.netns)
        _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("link", "set", host.bridge_end, "master", self.bridge)
        _ip("link", "set", host.bridge_end, "up")
        return host

    def run(self, host: Host, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (``ip netns exec`` execs it: the pid is the program's)."""
        with log.open("w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        host.procs.append(proc)
        return proc

    def cut(self, host: Host) -> None:
        """Unplug ``host`` from the switch: nothing it sends arrives, nothing reaches it."""
        _ip("link", "set", host.bridge_end, "down")
        self.cut_off.append(host)

    def heal(self, host: Host) -> None:
        """Plug ``host`` back in."""
        _ip("link", "set", host.bridge_end, "up")
        self.cut_off.remove(host)

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
        for host in self.hosts:
            _ip("link", "del", host.bridge_end, check=False)
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)

"""``spindle``: run the whole system locally (``spindle up``) and talk to it.

``spindle up`` starts, as supervised local processes with prefixed logs: an embedded Redis (unless
REDIS_URL is set), the gateway, WORKER_COUNT workers, the model-manager (and its job worker) and the
UI. Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
import time

import httpx

from launcher.redis_server import redis_command, wait_for_redis
from launcher.supervisor import Supervisor
from protocol.settings import REPO_ROOT, GatewaySettings, LauncherSettings, ManagerSettings, UISettings


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def build(settings: LauncherSettings, sup: Supervisor) -> dict[str, str]:
    """Add every configured service to ``sup``; returns the environment the children share."""
    services = {s.strip() for s in settings.services.split(",") if s.strip()}
    env: dict[str, str] = {}
    py = sys.executable
    if "REDIS_URL" not in os.environ:
        url = f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
        env["REDIS_URL"] = url
        sup.add("redis", redis_command(settings.embedded_redis_port, settings.state_dir / "redis"), env)
    if "gateway" in services:
        sup.add("gateway", [py, "-m", "gateway"], env)
    if "worker" in services:
        for i in range(settings.worker_count):
            port = settings.worker_metrics_port_base + i if settings.worker_metrics_port_base else 0
            sup.add(f"worker-{i}", [py, "-m", "worker"],
                    {**env, "WORKER_ID": f"{os.uname().nodename}-worker-{i}", "WORKER_METRICS_PORT": str(port)})
    if "model-manager" in services and _module_exists("model_manager.__main__"):
        sup.add("model-manager", [py, "-m", "model_manager"], env)
        if _module_exists("model_manager.jobs_worker"):
            sup.add("manager-jobs", [py, "-m", "model_manager.jobs_worker"], env)
    ui_app = REPO_ROOT / "ui" / "app.py"
    if "ui" in services and ui_app.exists() and _module_exists("streamlit"):
        ui = UISettings()
        # The UI follows GATEWAY_PORT/MANAGER_PORT unless its URLs are given explicitly.
        ui_env = {"GATEWAY_URL": f"http://127.0.0.1:{GatewaySettings().gateway_port}",
                  "MANAGER_URL": f"http://127.0.0.1:{ManagerSettings().manager_port}"}
        ui_env = {k: v for k, v in ui_env.items() if k not in os.environ}
        sup.add("ui", [py, "-m", "streamlit", "run", str(ui_app), "--server.port", str(ui.ui_port),
                       "--server.address", "127.0.0.1", "--server.headless", "true",
                       "--browser.gatherUsageStats", "false"], {**env, **ui_env})
    return env


def wait_ready(url: str, timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(0.5)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    settings = LauncherSettings()
    if args.workers is not None:
        settings.worker_count = args.workers
    sup = Supervisor()
    env = build(settings, sup)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if "REDIS_URL" in env:  # embedded Redis first, then everything that needs it
            sup.start(sup.children[0])
            wait_for_redis(env["REDIS_URL"], 15)
            for c in sup.children[1:]:
                sup.start(c)
        else:
            sup.start_all()
        gw = GatewaySettings()
        watcher = threading.Thread(target=sup.watch, args=(stop,), daemon=True)
        watcher.start()
        if any(c.name == "gateway" for c in sup.children):
            if wait_ready(f"http://127.0.0.1:{gw.gateway_port}/ready", args.ready_timeout, stop):
                ui = UISettings()
                sup.log("spindle", f"ready: API http://127.0.0.1:{gw.gateway_port}/v1 "
                        f"(docs /docs), UI http://127.0.0.1:{ui.ui_port}, model {gw.default_model}")
            elif not stop.is_set():
                sup.log("spindle", f"not ready after {args.ready_timeout:.0f}s; still trying (see logs)")
        stop.wait()
    finally:
        sup.log("spindle", "shutting down")
        sup.stop_all(settings.shutdown_grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spindle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole system locally")
    up.add_argument("--workers", type=int, default=None, help="number of workers (WORKER_COUNT)")
    up.add_argument("--ready-timeout", type=float, default=180.0)
    up.set_defaults(func=cmd_up)
    if _module_exists("launcher.models_cli"):
        from launcher import models_cli

        models_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

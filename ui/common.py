"""What every page shares: settings from the environment, the API clients, formatting, error display."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import streamlit as st

from protocol.settings import UISettings
from ui.client import GatewayClient, ManagerClient, ServiceError
from ui.series import History

T = TypeVar("T")
ICONS = {"unreachable": ":material/cloud_off:", "timeout": ":material/timer_off:",
         "overloaded": ":material/hourglass_top:", "auth": ":material/key_off:"}


@dataclass(frozen=True)
class Clients:
    settings: UISettings
    gateway: GatewayClient
    manager: ManagerClient


@st.cache_resource(show_spinner=False)
def _clients(gateway_url: str, manager_url: str, api_key: str, admin_api_key: str) -> Clients:
    # Keyed by the settings, so a changed environment (tests, a restart) gets new clients.
    settings = UISettings(gateway_url=gateway_url, manager_url=manager_url, api_key=api_key,
                          admin_api_key=admin_api_key)
    return Clients(settings, GatewayClient(gateway_url, api_key), ManagerClient(manager_url, admin_api_key))


def clients() -> Clients:
    s = UISettings()
    return _clients(s.gateway_url, s.manager_url, s.api_key, s.admin_api_key)


@st.cache_resource(show_spinner=False)
def metrics_history() -> History:
    """One history for the whole UI process, filled by whoever views the System page."""
    return History(window_s=600.0, min_interval=1.0)


def show_error(e: ServiceError, prefix: str = "") -> None:
    st.error(f"{prefix}{e.message}", icon=ICONS.get(e.kind, ":material/error:"))


def attempt(fn: Callable[[], T], prefix: str = "") -> T | None:
    """``fn()``, or None after showing its ServiceError as a readable message."""
    try:
        return fn()
    except ServiceError as e:
        show_error(e, prefix)
        return None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float | None) -> str:
    if not n:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "—"
    d = max(0.0, (time.time() if now is None else now) - ts)
    if d < 60:
        return f"{d:.1f} s ago"
    if d < 3600:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def reply_caption(meta: dict[str, Any]) -> str:
    """``model · TTFT 0.21 s · 37 tokens · 45.2 tok/s · stop`` for one assistant reply."""
    parts = [meta.get("model") or "?"]
    if meta.get("ttft") is not None:
        parts.append(f"TTFT {meta['ttft']:.2f} s")
    parts.append(f"{meta.get('tokens', 0)} tokens")
    if meta.get("tps") is not None:
        parts.append(f"{meta['tps']:.1f} tok/s")
    if meta.get("finish"):
        parts.append(str(meta["finish"]))
    return " · ".join(parts)

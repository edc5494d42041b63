"""System: live workers, queue depth per model, throughput and TTFT over the last minutes, Redis status.

Refreshes itself every ``REFRESH`` seconds (a Streamlit fragment). Workers, queues and Redis come from
the gateway's ``GET /system``; the charts from its Prometheus ``/metrics``, sampled into a history
the whole UI process shares (``ui.series``); disk and model jobs from the model-manager's ``/status``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from ui import series
from ui.client import ServiceError
from ui.common import ago, clients, human_bytes, metrics_history, show_error

REFRESH = 2.0

c = clients()
history = metrics_history()

st.title("System")
auto = st.toggle("Refresh every 2 s", value=True, key="sys_auto")


def tile(col: Any, label: str, value: Any, note: str | None = None) -> None:
    col.metric(label, value, note, delta_color="off", delta_arrow="off", border=True)


def workers_table(workers: list[dict[str, Any]], now: float) -> pd.DataFrame:
    return pd.DataFrame([{
        "worker": w.get("worker_id"), "models": ", ".join(w.get("models") or []),
        "device": f"{w.get('device') or '?'} {w.get('dtype') or ''}".strip(), "engine": w.get("engine"),
        "slots used": f"{w.get('running', 0)} / {w.get('max_batch', 0)}", "waiting": w.get("waiting", 0),
        "KV usage": f"{100 * float(w.get('kv_usage') or 0.0):.0f}%", "last heartbeat": ago(w.get("heartbeat_at"), now),
        "up": ago(w.get("started_at"), now).replace(" ago", ""), "state": "draining" if w.get("draining") else "live",
    } for w in sorted(workers, key=lambda w: w.get("worker_id", ""))])


def line_chart(df: pd.DataFrame, y: str) -> alt.Chart:
    return alt.Chart(df).mark_line().encode(
        x=alt.X("time:T", title=None, axis=alt.Axis(format="%H:%M:%S")),
        y=alt.Y(f"{y}:Q", title=y, axis=alt.Axis(format=",.3~f")),
        color=alt.Color("model:N", legend=alt.Legend(orient="bottom")),
        tooltip=["model", "time:T", alt.Tooltip(f"{y}:Q", format=".3f")]).properties(height=220)


def charts() -> None:
    rates = history.rates()
    if not rates:
        st.caption("Collecting samples: the charts start after two scrapes of the gateway's metrics.")
        return
    df = pd.DataFrame([{"time": pd.Timestamp(r.at, unit="s", tz="UTC"), "model": r.model,
                        "tokens/s": r.tokens_per_s, "requests/s": r.requests_per_s,
                        "TTFT (s)": r.ttft_mean_s} for r in rates])
    left, right = st.columns(2)
    with left:
        st.markdown("**Throughput** (generated tokens/s)")
        st.altair_chart(line_chart(df, "tokens/s"))
    with right:
        st.markdown("**Time to first token** (mean per interval, s)")
        ttft = df.dropna(subset=["TTFT (s)"])
        if ttft.empty:
            st.caption("No request got its first token in the window yet.")
        else:
            st.altair_chart(line_chart(ttft, "TTFT (s)"))
    p95 = {m: history.window_ttft_quantile(0.95, m) for m in sorted(set(df["model"]))}
    summary = ", ".join(f"{m}: {v:.3f} s" for m, v in p95.items() if v is not None)
    window = min(history.window_s, rates[-1].at - history.samples()[0].at)
    st.caption(f"Window: last {window / 60:.1f} min · TTFT p95 {summary or '—'}")


@st.fragment(run_every=REFRESH if auto else None)
def live() -> None:
    now = time.time()
    try:
        system = c.gateway.system()
    except ServiceError as e:
        show_error(e)
        system = None
    if history.due(now):
        # On failure the charts just miss a sample; the error above already says the gateway is down.
        with contextlib.suppress(ServiceError, ValueError):
            history.add(series.parse(c.gateway.metrics_text(), now))
    try:
        status: dict[str, Any] | None = c.manager.status()
    except ServiceError as e:
        show_error(e)
        status = None

    if system is not None:
        redis, workers, queues = system.get("redis", {}), system.get("workers", []), system.get("queues", [])
        m1, m2, m3, m4 = st.columns(4)
        tile(m1, "Redis", "up" if redis.get("ok") else "down",
             f"v{redis.get('version')} · {redis.get('ping_ms', 0):.1f} ms ping" if redis.get("ok")
             else redis.get("error", ""))
        tile(m2, "Live workers", len(workers), f"{sum(w.get('running', 0) for w in workers)} running")
        tile(m3, "Waiting in queues", sum(q.get("waiting", 0) for q in queues),
             f"{sum(q.get('in_flight', 0) for q in queues)} in flight")
        if redis.get("ok"):
            tile(m4, "Redis memory", human_bytes(redis.get("used_memory_bytes")),
                 f"{redis.get('connected_clients')} clients")

        st.subheader("Workers")
        if workers:
            st.table(workers_table(workers, system.get("time") or now), hide_index=True, border="horizontal")
        else:
            st.warning("No live worker: nothing can answer requests.", icon=":material/warning:")

        st.subheader("Queues")
        if queues:
            st.table(pd.DataFrame([{"model": q.get("model"), "waiting": q.get("waiting"),
                                   "in flight": q.get("in_flight"), "stream length": q.get("length")}
                                  for q in queues]), hide_index=True, border="horizontal")
            st.caption(f"A model's queue takes at most {system.get('queue_capacity')} waiting requests; "
                       "past that the gateway answers 429.")
        else:
            st.caption("No job queues yet.")

    st.subheader("Traffic")
    charts()

    if status is not None:
        st.subheader("Model-manager")
        disk, jobs = status.get("disk", {}), status.get("jobs", {})
        d1, d2, d3 = st.columns(3)
        tile(d1, "Disk free", human_bytes(disk.get("free")), f"of {human_bytes(disk.get('total'))}")
        tile(d2, "Models in the volume", status.get("models", 0))
        tile(d3, "Model jobs running", jobs.get("started", 0),
             f"{jobs.get('queued', 0)} queued · {jobs.get('job_workers', 0)} job workers")
    st.caption(f"Updated {time.strftime('%H:%M:%S', time.localtime(now))}")


live()

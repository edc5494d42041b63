"""Models: what is in the artifact volume and who serves it; pull, search, import, optimize, load/unload,
delete. Long work (pull, import, optimize) runs as model-manager jobs; this page follows a job's live
progress stream to the end, then reruns so the list shows the result.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from optimizer.plan import PASSES
from ui.client import ManagerClient, ServiceError, job_done, job_fraction
from ui.common import ago, attempt, clients, human_bytes, human_count, show_error

c = clients()
mgr: ManagerClient = c.manager
ss = st.session_state


NOTICE_SECONDS = 120.0
DASH = "—"  # st.table renders cells as Markdown, where a lone "-" is a bullet


def notify(kind: str, text: str, progress: float | None = None) -> None:
    """A message shown at the top of the page (for a while) after the rerun that refreshes the list."""
    ss.models_notice = {"kind": kind, "text": text, "progress": progress, "at": time.time()}


def percent(job: dict[str, Any]) -> int:
    return round(100 * job_fraction(job))


def progress_text(job: dict[str, Any]) -> str:
    names = ", ".join(job.get("names") or []) or job.get("kind", "job")
    stage = job.get("stage", "?")
    pct = f"{percent(job)}%"
    detail = ""
    if job.get("bytes_total") and job.get("kind") in ("pull", "import"):
        detail = f" · {human_bytes(job.get('bytes_done'))} of {human_bytes(job.get('bytes_total'))}"
    if job.get("files_total"):
        detail += f" · file {job.get('files_done', 0)}/{job['files_total']}"
    if job.get("message") and stage not in ("ready",):
        detail += f" · {job['message']}"
    return f"{job.get('kind', 'job')} {names}: {stage} {pct}{detail}"


def follow(job: dict[str, Any]) -> dict[str, Any] | None:
    """Show the job's progress bar until it ends; its last view (None if following failed)."""
    bar = st.progress(percent(job), text=progress_text(job))
    last = job
    try:
        with mgr.follow_job(job["id"]) as views:
            for view in views:
                last = view
                bar.progress(percent(view), text=progress_text(view))
                if job_done(view):
                    break
    except ServiceError as e:
        show_error(e, "Lost the job's progress stream: ")
        return None
    return last


def finish(job: dict[str, Any] | None, what: str) -> None:
    """After ``follow``: remember the outcome and rerun so the model list is fresh."""
    if job is None:
        return
    if job.get("stage") == "ready":
        names = [m.get("name") for m in (job.get("result") or {}).get("models", [])] or job.get("names", [])
        notify("success", f"{what}: {', '.join(n for n in names if n)} ready", 1.0)
        ss.last_job_result = job
    else:
        notify("error", f"{what} failed: {job.get('error') or job.get('stage')}")
        ss.last_job_result = job
    st.rerun()


def quality_table(result: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for m in result.get("models", []):
        q = m.get("quality") or {}
        ratio, agree = q.get("perplexity_ratio"), q.get("top1_agreement")
        max_ratio, min_agree = q.get("max_perplexity_ratio"), q.get("min_top1_agreement")
        passed = None
        if None not in (ratio, agree, max_ratio, min_agree):
            passed = ratio <= max_ratio and agree >= min_agree
        rows.append({"model": m.get("name"), "pass": m.get("pass"), "perplexity": q.get("perplexity"),
                     "source perplexity": q.get("source_perplexity"), "ratio": ratio, "max ratio": max_ratio,
                     "top-1 agreement": agree, "min agreement": min_agree, "gate": "passed" if passed else
                     ("failed" if passed is False else DASH)})
    return pd.DataFrame(rows)


st.title("Models")

notice = ss.get("models_notice")
if notice and time.time() - notice["at"] > NOTICE_SECONDS:
    notice = ss.models_notice = None
if notice:
    if notice.get("progress") is not None:
        st.progress(round(100 * notice["progress"]), text=f"{notice['text']} · 100%")
    (st.success if notice["kind"] == "success" else st.error)(notice["text"])
    last = ss.get("last_job_result")
    if last and last.get("kind") == "optimize" and last.get("result"):
        st.caption("Quality gate (held-out text): perplexity ratio to the source and greedy top-1 agreement")
        st.table(quality_table(last["result"]), hide_index=True)

# ----------------------------------------------------------------------------------------- the list
models = attempt(mgr.models) or []
if models:
    table = pd.DataFrame([{
        "name": m.get("id"), "status": m.get("status"), "workers": ", ".join(m.get("workers") or []) or DASH,
        "size": human_bytes(m.get("size_bytes")),
        "dtype": m.get("dtype") + (f" ({m['quantization']})" if m.get("quantization") else ""),
        "params": human_count(m.get("parameter_count")), "context": m.get("context_length"),
        "architecture": (m.get("architecture") or DASH).removesuffix("ForCausalLM"),
        "source": (m.get("source") or DASH) + (" (bundled)" if m.get("bundled") else ""),
        "passes": ", ".join(m.get("passes") or []) or DASH,
    } for m in models])
    st.table(table, hide_index=True, border="horizontal")
else:
    st.info("No models in the artifact volume yet: pull one below.", icon=":material/info:")

# ------------------------------------------------------------------------------- one model's actions
names = [m["id"] for m in models]
serving = {m["id"]: m.get("workers") or [] for m in models}
if names:
    st.subheader("Manage")
    pick, b1, b2, b3 = st.columns([4, 1, 1, 1], vertical_alignment="bottom")
    target = pick.selectbox("Model", names, key="mm_target")
    if b1.button("Load", icon=":material/play_arrow:", key="mm_load"):
        r = attempt(lambda: mgr.load(target))
        if r is not None:
            st.success(f"Asked the workers to load {target} ({r.get('receivers', 0)} listening); "
                       "the list shows it as serving once a worker reports it.")
    if b2.button("Unload", icon=":material/pause:", key="mm_unload"):
        r = attempt(lambda: mgr.unload(target))
        if r is not None:
            st.success(f"Asked the workers serving {target} to unload it ({r.get('receivers', 0)} listening).")
    if b3.button("Delete", icon=":material/delete:", key="mm_delete"):
        ss.mm_confirm_delete = target
    if ss.get("mm_confirm_delete") == target:
        with st.container(border=True):
            st.warning(f"Delete **{target}** from the artifact volume? This cannot be undone.",
                       icon=":material/warning:")
            force = False
            if serving.get(target):
                force = st.checkbox(f"It is served by {', '.join(serving[target])}: unload it and delete anyway",
                                    key="mm_force")
            y, n, _ = st.columns([1, 1, 5])
            if y.button("Yes, delete", type="primary", key="mm_delete_yes"):
                r = attempt(lambda: mgr.delete(target, force=force))
                ss.mm_confirm_delete = None
                if r is not None:
                    notify("success", f"Deleted {target}")
                    st.rerun()
            if n.button("Cancel", key="mm_delete_no"):
                ss.mm_confirm_delete = None
                st.rerun()

# ------------------------------------------------------------------------- pull, search, import, optimize
pull_tab, search_tab, import_tab, optimize_tab = st.tabs(["Pull", "Search the Hub", "Import", "Optimize"])

with pull_tab, st.form("pull_form"):
    repo_id = st.text_input("Hub repo id", key="pull_repo", placeholder="HuggingFaceTB/SmolLM2-135M-Instruct")
    col1, col2 = st.columns(2)
    revision = col1.text_input("Revision", value="main", key="pull_revision")
    local_name = col2.text_input("Name in the volume (optional)", key="pull_name",
                                 placeholder="default: the repo's name")
    if st.form_submit_button("Pull", icon=":material/download:", type="primary"):
        if not repo_id.strip():
            st.error("Enter a repo id, like owner/name.")
        else:
            job = attempt(lambda: mgr.pull(repo_id.strip(), revision.strip() or "main", local_name.strip() or None))
            if job is not None:
                finish(follow(job), f"Pull of {repo_id.strip()}")

with search_tab:
    with st.form("search_form"):
        query = st.text_input("Search text-generation models on the Hub", key="search_q")
        if st.form_submit_button("Search", icon=":material/search:") and query.strip():
            ss.search_results = attempt(lambda: mgr.search(query.strip(), limit=20))
    results = ss.get("search_results")
    if results is not None:
        if not results:
            st.info("Nothing found.")
        for i, r in enumerate(results):
            col1, col2 = st.columns([5, 1])
            col1.markdown(f"**{r.get('id')}** · {human_count(r.get('downloads'))} downloads · "
                          f"{r.get('likes') or 0} likes")
            if col2.button("Pull", key=f"search_pull_{i}"):
                job = attempt(lambda r=r: mgr.pull(r["id"]))
                if job is not None:
                    finish(follow(job), f"Pull of {r['id']}")

with import_tab:
    st.caption("From a directory or tarball on the model-manager's machine (below its IMPORT_DIR), or upload "
               "a tarball. The same checks as a pull: safetensors weights, config and tokenizer.")
    source = st.radio("Source", ["Path on the server", "Upload a tarball"], horizontal=True, key="import_source")
    with st.form("import_form"):
        name = st.text_input("Name in the volume", key="import_name")
        path = upload = None
        if source == "Path on the server":
            path = st.text_input("Path (relative to IMPORT_DIR)", key="import_path")
        else:
            upload = st.file_uploader("Tarball", type=["tar", "gz", "tgz", "xz", "bz2"], key="import_file")
        if st.form_submit_button("Import", icon=":material/upload:"):
            if not name.strip():
                st.error("Enter a name for the model.")
            elif path is not None and not path.strip():
                st.error("Enter a path.")
            elif path is None and upload is None:
                st.error("Choose a tarball to upload.")
            else:
                job = attempt(lambda: mgr.import_path(path.strip(), name.strip()) if path is not None
                              else mgr.import_tarball(upload.getvalue(), name.strip()))
                if job is not None:
                    finish(follow(job), f"Import of {name.strip()}")

with optimize_tab:
    st.caption("Each pass writes a new model `<name>-<pass>` and must pass a quality gate on held-out text: "
               "perplexity within a ratio of the source's and greedy top-1 agreement above a threshold. "
               "A model that fails its gate is not kept.")
    sources = [m["id"] for m in models if not m.get("quantization")]
    with st.form("optimize_form"):
        src = st.selectbox("Source model", sources or ["-"], key="opt_source")
        passes = st.multiselect("Passes", list(PASSES), default=["bf16"], key="opt_passes")
        custom = st.checkbox("Custom gate (default: per pass)", key="opt_custom")
        col1, col2 = st.columns(2)
        ratio = col1.number_input("Max perplexity ratio", 1.0001, 10.0, 1.05, 0.01, format="%.4f", key="opt_ratio")
        agree = col2.number_input("Min top-1 agreement", 0.0, 1.0, 0.9, 0.01, key="opt_agree")
        if st.form_submit_button("Optimize", icon=":material/tune:"):
            if not sources or not passes:
                st.error("Choose a source model and at least one pass.")
            else:
                job = attempt(lambda: mgr.optimize(src, passes, ratio if custom else None, agree if custom else None))
                if job is not None:
                    finish(follow(job), f"Optimize {src} ({', '.join(passes)})")


# ----------------------------------------------------------------------------------------- recent jobs
@st.fragment(run_every=3.0)
def recent_jobs() -> None:
    jobs = attempt(lambda: mgr.jobs(limit=8)) or []
    live = [j for j in jobs if not job_done(j)]
    st.subheader("Recent jobs")
    if not jobs:
        st.caption("No jobs yet.")
    for j in jobs:
        line = f"`{j.get('kind')}` **{', '.join(j.get('names') or [])}** · {j.get('stage')} · " \
               f"{ago(j.get('created_at'))}"
        if job_done(j):
            st.markdown(line + (f" · :red[{j['error']}]" if j.get("error") else ""))
        else:
            st.progress(percent(j), text=progress_text(j))
    # A job that ended while we watched changes the list: refresh the whole page once.
    if ss.get("jobs_were_live") and not live:
        ss.jobs_were_live = False
        st.rerun()
    ss.jobs_were_live = bool(live)


recent_jobs()

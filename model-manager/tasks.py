"""The functions rq runs in ``python -m model_manager.jobs_worker``: pull, import, optimize.

Each takes ``job_names`` (the model names it holds locks for) and ``params`` (JSON), reports progress
into its rq job (``progress.Progress``), releases its name locks when it ends, and returns a small
JSON result. A failure the user can act on becomes stage ``failed`` with a one-line ``error``; the
exception is re-raised so rq marks the job failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rq import get_current_job

from model_manager import jobs
from model_manager.importer import import_model
from model_manager.install import InstallError
from model_manager.progress import Progress
from model_manager.pull import Hub, PullError, pull
from protocol import keys
from protocol.artifacts import ArtifactStore, InvalidModelName, Manifest
from protocol.settings import ManagerSettings

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job that failed for a reason stated in its message (no traceback needed)."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    from optimizer import OptimizeError

    return (JobFailed, PullError, InstallError, InvalidModelName, OptimizeError)


def _run(kind: str, job_names: list[str], body: Callable[[ManagerSettings, ArtifactStore, Progress], dict]) -> dict:
    settings = ManagerSettings()
    store = ArtifactStore(settings.artifacts_dir, settings.bundled_models_dir)
    job = get_current_job()
    conn = job.connection if job else None
    if conn is not None:
        conn.hincrby(keys.MANAGER_STATS_KEY, f"jobs:{kind}:started", 1)
    try:
        with Progress(job) as progress:
            try:
                result = body(settings, store, progress)
            except _expected_errors() as e:
                progress.update(stage="failed", error=str(e), message="")
                raise JobFailed(str(e)) from None
            except Exception as e:
                log.exception("%s job failed", kind)
                progress.update(stage="failed", error=f"internal error: {type(e).__name__}: {e}", message="")
                raise
            progress.update(stage="finishing", message="done", current_file="")
        if conn is not None:
            conn.hincrby(keys.MANAGER_STATS_KEY, f"jobs:{kind}:finished", 1)
        return result
    except BaseException:
        if conn is not None:
            conn.hincrby(keys.MANAGER_STATS_KEY, f"jobs:{kind}:failed", 1)
        raise
    finally:
        if conn is not None and job is not None:
            jobs.release(conn, job_names, job.id)


def _summary(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "size_bytes": m.size_bytes, "files": len(m.files), "revision": m.revision,
            "dtype": m.dtype, "quantization": m.quantization, "quality": m.quality}


def run_pull(job_names: list[str], params: dict[str, Any]) -> dict:
    def body(settings: ManagerSettings, store: ArtifactStore, progress: Progress) -> dict:
        hub = Hub(settings.hf_endpoint, settings.hf_token)
        m = pull(store, repo_id=params["repo_id"], revision=params.get("revision") or "main", name=params["name"],
                 hub=hub, allow_pickle=settings.allow_pickle_weights, min_free_bytes=settings.min_free_disk_bytes,
                 progress=progress)
        return {"models": [_summary(m)]}

    return _run("pull", job_names, body)


def run_import(job_names: list[str], params: dict[str, Any]) -> dict:
    def body(settings: ManagerSettings, store: ArtifactStore, progress: Progress) -> dict:
        source = Path(params["source"])
        try:
            m = import_model(store, name=params["name"], source=source, label=params.get("label", source.name),
                             allow_pickle=settings.allow_pickle_weights, max_bytes=settings.max_upload_bytes,
                             min_free_bytes=settings.min_free_disk_bytes, progress=progress)
        finally:
            if params.get("delete_source"):  # an uploaded tarball in .tmp
                source.unlink(missing_ok=True)
        return {"models": [_summary(m)]}

    return _run("import", job_names, body)


def run_optimize(job_names: list[str], params: dict[str, Any]) -> dict:
    def body(settings: ManagerSettings, store: ArtifactStore, progress: Progress) -> dict:
        from optimizer import GateFailed, quality
        from optimizer.passes import optimize

        gates = {}
        for p in params["passes"]:
            base = quality.DEFAULT_GATES.get(p, quality.Gate(1.05, 0.9))
            ratio, agreement = params.get("max_perplexity_ratio"), params.get("min_top1_agreement")
            gates[p] = quality.Gate(base.max_perplexity_ratio if ratio is None else ratio,
                                    base.min_top1_agreement if agreement is None else agreement)

        def report(stage: str, message: str = "", fraction: float = 0.0) -> None:
            progress.update(stage=stage, message=message, bytes_done=int(fraction * 1000), bytes_total=1000)

        try:
            results = optimize(store, params["name"], params["passes"], gates=gates, progress=report,
                               min_free_bytes=settings.min_free_disk_bytes)
        except GateFailed as e:
            passed = [r.output for r in e.results if r.passed]
            raise JobFailed(f"{e}" + (f" (kept: {', '.join(passed)})" if passed else "")) from None
        return {"models": [{"name": r.output, "pass": r.pass_name, "quality": r.quality} for r in results]}

    return _run("optimize", job_names, body)

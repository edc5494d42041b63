"""rq jobs as the API sees them: enqueue with a per-name lock, read progress, count.

Each job writes a progress record into its rq ``meta["progress"]`` (see ``progress.py``):
``stage`` (queued, starting, downloading, verifying, extracting, loading, converting, evaluating,
finishing; then ready or failed once rq has recorded the end), ``bytes_done``/``bytes_total``,
``files_done``/``files_total``, ``current_file``, ``message``, ``error`` and ``updated_at``
(refreshed at least every two seconds while it runs).

Names: a job that will write model ``<name>`` holds ``keys.manager_lock_key(<name>)`` (its job id)
from enqueue until it ends. A second request for the same name gets a 409, unless the holder is dead:
finished, failed, gone, or started but silent for JOB_STALE_SECONDS (its worker crashed). Then the
new job takes over, and a pull finds the dead job's partial download and resumes it.

These functions are synchronous (rq is); the API calls them on threads.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel, Field
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from protocol import keys

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
TASKS = {"pull": "model_manager.tasks.run_pull", "import": "model_manager.tasks.run_import",
         "optimize": "model_manager.tasks.run_optimize"}
TIMEOUTS = {"pull": 24 * 3600, "import": 6 * 3600, "optimize": 6 * 3600}
KEEP_SECONDS = 7 * 24 * 3600
LIVE = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}
FINAL_STATUSES = ("finished", "failed", "canceled", "stopped")
# Jobs waiting for the jobs worker; past it a new request gets a 429 (the queue is bounded).
MAX_QUEUED = 64


class JobView(BaseModel):
    """What ``GET /models/jobs/{id}`` returns and the progress stream sends, one per line."""

    id: str
    object: str = "model.job"
    kind: str
    names: list[str]
    status: str  # rq's: queued, started, finished, failed, canceled, ...
    stage: str
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    current_file: str = ""
    message: str = ""
    error: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    stalled: bool = False

    @property
    def done(self) -> bool:
        """rq has recorded the end (stage is then "ready" or "failed")."""
        return self.status in FINAL_STATUSES

    @property
    def percent(self) -> float:
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 0.0


def queue(conn: redis.Redis) -> Queue:
    return Queue(keys.MODEL_JOBS_QUEUE, connection=conn, serializer=JSONSerializer)


def fetch(conn: redis.Redis, job_id: str) -> Job | None:
    if not JOB_ID_RE.match(job_id):
        return None
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def _is_stale(job: Job, stale_seconds: float) -> bool:
    """Started, but neither the start nor a progress report is younger than ``stale_seconds``."""
    progress = job.meta.get("progress") or {}
    started = job.started_at.timestamp() if job.started_at else time.time()
    last = max(float(progress.get("updated_at") or 0.0), started)
    return time.time() - last > stale_seconds


def is_alive(job: Job | None, stale_seconds: float) -> bool:
    if job is None:
        return False
    status = job.get_status(refresh=False)
    if status not in LIVE:
        return False
    return not (status == JobStatus.STARTED and _is_stale(job, stale_seconds))


def view(job: Job, stale_seconds: float) -> JobView:
    status = job.get_status(refresh=False)
    p = dict(job.meta.get("progress") or {})
    stage = p.pop("stage", "queued")
    error = p.pop("error", None)
    result = None
    if status == JobStatus.FINISHED:  # only rq's word makes a job ready: the result is stored by then
        stage = "ready"
        rv = job.return_value(refresh=False)
        result = rv if isinstance(rv, dict) else None
    elif status in (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED) and stage != "failed":
        stage = "failed"
        error = error or f"the job {status.value if hasattr(status, 'value') else status} (worker stopped or crashed)"
    stalled = status == JobStatus.STARTED and _is_stale(job, stale_seconds)
    if stalled:
        error = error or "no progress report for a while: the jobs worker may have crashed; pull again to resume"
    fields = {k: p[k] for k in ("bytes_done", "bytes_total", "files_done", "files_total", "current_file",
                                "message", "updated_at") if k in p}
    return JobView(id=job.id, kind=job.meta.get("kind", "?"), names=list(job.meta.get("names", [])),
                   status=str(status.value if hasattr(status, "value") else status), stage=stage, error=error,
                   params=dict(job.meta.get("params", {})), result=result,
                   created_at=job.created_at.timestamp() if job.created_at else 0.0, stalled=stalled, **fields)


class NameBusy(Exception):
    def __init__(self, name: str, job: Job):
        super().__init__(f"model '{name}' is being written by job {job.id} ({job.meta.get('kind', '?')})")
        self.name = name
        self.job = job


def _claim(conn: redis.Redis, names: list[str], job_id: str, stale_seconds: float) -> None:
    """Take every name's lock for ``job_id`` or raise NameBusy (WATCH/MULTI, so two requests cannot both win)."""
    lock_keys = [keys.manager_lock_key(n) for n in names]
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(*lock_keys)
                for name, key in zip(names, lock_keys, strict=True):
                    holder = pipe.get(key)
                    if holder:
                        job = fetch(conn, holder.decode())
                        if is_alive(job, stale_seconds):
                            assert job is not None
                            raise NameBusy(name, job)
                pipe.multi()
                for key in lock_keys:
                    pipe.set(key, job_id, ex=KEEP_SECONDS)
                pipe.execute()
                return
            except redis.WatchError:
                continue


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def release(conn: redis.Redis, names: list[str], job_id: str) -> None:
    for n in names:
        conn.eval(_RELEASE, 1, keys.manager_lock_key(n), job_id)


class QueueFull(Exception):
    pass


def enqueue(conn: redis.Redis, kind: str, names: list[str], params: dict[str, Any], stale_seconds: float) -> Job:
    """Claim ``names`` and queue a ``kind`` job; raises NameBusy when a live job holds one of them and
    QueueFull when MAX_QUEUED jobs are already waiting."""
    if queue(conn).count >= MAX_QUEUED:
        raise QueueFull(f"{MAX_QUEUED} model jobs are already waiting; try again when some have finished")
    job_id = uuid.uuid4().hex
    _claim(conn, names, job_id, stale_seconds)
    now = time.time()
    meta = {"kind": kind, "names": names, "params": params,
            "progress": {"stage": "queued", "message": "waiting for a jobs worker", "updated_at": now}}
    try:
        job = queue(conn).enqueue_call(TASKS[kind], kwargs={"job_names": names, "params": params}, job_id=job_id,
                                       timeout=TIMEOUTS[kind], result_ttl=KEEP_SECONDS, failure_ttl=KEEP_SECONDS,
                                       meta=meta, description=f"{kind} {','.join(names)}")
    except Exception:
        release(conn, names, job_id)
        raise
    conn.hincrby(keys.MANAGER_STATS_KEY, f"jobs:{kind}:queued", 1)
    return job


def recent(conn: redis.Redis, limit: int = 50) -> list[Job]:
    q = queue(conn)
    ids: list[str] = []
    ids += q.started_job_registry.get_job_ids()
    ids += q.get_job_ids(0, limit)
    ids += q.finished_job_registry.get_job_ids(0, limit, desc=True)
    ids += q.failed_job_registry.get_job_ids(0, limit, desc=True)
    seen: list[str] = list(dict.fromkeys(ids))[: limit * 2]
    jobs = [j for j in Job.fetch_many(seen, connection=conn, serializer=JSONSerializer) if j is not None]
    jobs.sort(key=lambda j: j.created_at.timestamp() if j.created_at else 0.0, reverse=True)
    return jobs[:limit]


def counts(conn: redis.Redis) -> dict[str, int]:
    from rq import Worker

    q = queue(conn)
    return {"queued": q.count, "started": q.started_job_registry.count, "finished": q.finished_job_registry.count,
            "failed": q.failed_job_registry.count, "job_workers": Worker.count(connection=conn, queue=q)}


def stats(conn: redis.Redis) -> dict[str, int]:
    raw = conn.hgetall(keys.MANAGER_STATS_KEY)
    return {k.decode(): int(v) for k, v in raw.items()}

"""The model-manager REST API.

Read:    GET /health, /ready, /status, /metrics, /models, /models/{name}, /models/search?q=,
         /models/jobs, /models/jobs/{id}, /models/jobs/{id}/stream (NDJSON progress, like Ollama's pull)
Mutate:  POST /models/pull, POST /models/import, DELETE /models/{name}, POST /models/{name}/optimize,
         POST /models/{name}/load, POST /models/{name}/unload  (Bearer ADMIN_API_KEY when one is set)

Long work goes to rq (``jobs.py``); file system and rq calls run on threads; nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_manager import errors, importer, jobs
from model_manager.install import InstallError, check_name_free
from model_manager.metrics import Metrics
from model_manager.pull import PullError, hub_error, validate_repo_id, validate_revision
from model_manager.schemas import ControlRequest, ImportPathRequest, ModelView, OptimizeRequest, PullRequest
from optimizer.plan import OptimizeError, check_passes, check_request, output_name
from protocol import keys
from protocol.artifacts import ArtifactStore, Manifest, validate_name
from protocol.errors import APIError, overloaded, unavailable
from protocol.messages import ControlMessage, WorkerInfo
from protocol.settings import ManagerSettings

log = logging.getLogger("model_manager")

JSON_BODY_LIMIT = 1 << 20
TAR_TYPES = {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip",
             "application/x-bzip2", "application/x-xz", "application/octet-stream"}
STREAM_POLL = 0.5
STREAM_KEEPALIVE = 10.0
MAX_WORKER_KEYS = 1000

# What the OpenAPI document says beyond what FastAPI infers (errors: model_manager.errors.documented).
METRICS_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
PROGRESS_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"description": "The job's progress: one JobView per line until it ends",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}
JOB_DOC: dict[int | str, dict[str, Any]] = {
    202: {"model": jobs.JobView, "description": "The job, queued; with stream=true its progress as NDJSON",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}
CONTROL_ERRORS = errors.documented(400, 401, 404, 413, 503)
IMPORT_BODY_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ImportPathRequest.model_json_schema()},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("application/x-tar", "application/gzip")}}}}


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413 (Content-Length up front, chunked ones as they arrive).

    POST /models/import streams its tarball itself with MAX_UPLOAD_BYTES as the limit.
    """

    def __init__(self, app: ASGIApp, limit: int, unlimited_paths: tuple[str, ...]):
        self.app = app
        self.limit = limit
        self.unlimited = unlimited_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.unlimited:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_error(send, errors.too_large(self.limit))
                return
        seen, refused = 0, False

        async def limited() -> Message:
            """Past the limit: answer 413 ourselves and tell the app the client went away."""
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if not refused:
                        refused = True
                        await _send_error(send, errors.too_large(self.limit))
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # the app's own answer to the "disconnect" goes nowhere
                await send(message)

        await self.app(scope, limited, guarded)


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class State:
    def __init__(self, settings: ManagerSettings):
        self.settings = settings
        self.store = ArtifactStore(settings.artifacts_dir, settings.bundled_models_dir)
        self.redis = aredis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5)
        self.sync = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.metrics = Metrics()

    async def close(self) -> None:
        await self.redis.aclose()
        self.sync.close()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def workers(self) -> list[WorkerInfo]:
        found: list[str] = []
        async for key in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN, count=200):
            found.append(key)
            if len(found) >= MAX_WORKER_KEYS:
                break
        out = []
        for raw in await self.redis.mget(found) if found else []:
            if raw:
                try:
                    out.append(WorkerInfo.model_validate_json(raw))
                except ValidationError:
                    continue
        return out

    async def serving(self) -> dict[str, list[str]]:
        by_model: dict[str, list[str]] = {}
        for w in await self.workers():
            for m in w.models:
                by_model.setdefault(m, []).append(w.worker_id)
        return by_model

    async def publish(self, msg: ControlMessage) -> int:
        return int(await self.redis.publish(keys.CONTROL_CHANNEL, msg.encode()))

    async def job_view(self, job_id: str) -> jobs.JobView | None:
        def read() -> jobs.JobView | None:
            job = jobs.fetch(self.sync, job_id)
            return jobs.view(job, self.settings.job_stale_seconds) if job else None

        return await self.run(read)

    async def enqueue(self, kind: str, names: list[str], params: dict[str, Any]) -> jobs.JobView:
        def go() -> jobs.JobView:
            job = jobs.enqueue(self.sync, kind, names, params, self.settings.job_stale_seconds)
            return jobs.view(job, self.settings.job_stale_seconds)

        try:
            return await self.run(go)
        except jobs.NameBusy as e:
            raise errors.conflict(str(e), "job_in_progress") from None
        except jobs.QueueFull as e:
            raise overloaded(str(e), retry_after=30) from None


def _job_not_found(job_id: str) -> APIError:
    return APIError(404, f"No job with id '{job_id}'", "not_found_error", "job_id", "job_not_found")


def create_app(settings: ManagerSettings | None = None) -> FastAPI:
    settings = settings or ManagerSettings()
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(settings.artifacts_dir.mkdir, parents=True, exist_ok=True)
        starter = asyncio.create_task(pull_on_start(state)) if settings.pull_on_start.strip() else None
        try:
            yield
        finally:
            if starter is not None:
                starter.cancel()
                await asyncio.gather(starter, return_exceptions=True)
            await state.close()

    app = FastAPI(title="spindle model-manager", version="1", lifespan=lifespan,
                  description="Pull, import, list, delete, optimize, load and unload models.")
    errors.install(app)
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT, unlimited_paths=("/models/import",))
    app.state.manager = state

    def require_admin(request: Request) -> None:
        key = settings.admin_api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "This endpoint needs the admin API key: 'Authorization: Bearer <ADMIN_API_KEY>'",
                           "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    admin = [Depends(require_admin)]

    async def stream_job(job_id: str) -> AsyncIterator[bytes]:
        last, last_at = "", 0.0
        while True:
            v = await state.job_view(job_id)
            if v is None:
                yield (json.dumps(APIError(404, f"job {job_id} disappeared", "not_found_error").body())
                       + "\n").encode()
                return
            line = v.model_dump_json(exclude={"updated_at"})
            now = time.monotonic()
            if line != last or now - last_at >= STREAM_KEEPALIVE:
                yield (v.model_dump_json() + "\n").encode()
                last, last_at = line, now
            if v.done or v.stalled:
                return
            await asyncio.sleep(STREAM_POLL)

    def job_response(v: jobs.JobView, stream: bool, status: int = 202) -> Response:
        if stream:
            return StreamingResponse(stream_job(v.id), media_type="application/x-ndjson")
        return JSONResponse(v.model_dump(), status_code=status)

    async def check_new_name(name: str, param: str = "name") -> None:
        validate_name(name)
        try:
            await state.run(check_name_free, state.store, name)
        except InstallError as e:
            code = "model_exists" if "exists" in str(e) else "invalid_model_name"
            raise (errors.conflict(str(e), code) if code == "model_exists"
                   else errors.bad_request(str(e), param, code)) from None

    # ---------------------------------------------------------------- health, status, metrics
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=errors.documented(503))
    async def ready() -> JSONResponse:
        try:
            await state.redis.ping()
        except redis.RedisError as e:
            err = unavailable(f"Redis is unavailable: {type(e).__name__}", 2, "redis_unavailable")
            return JSONResponse(err.body(), status_code=503, headers=err.headers)
        return JSONResponse({"status": "ready"})

    def disk() -> dict[str, Any]:
        usage = shutil.disk_usage(settings.artifacts_dir)
        return {"path": str(settings.artifacts_dir), "total": usage.total, "used": usage.used, "free": usage.free}

    @app.get("/status", responses=errors.documented(503))
    async def status() -> dict[str, Any]:
        d, counts, models = await asyncio.gather(state.run(disk), state.run(jobs.counts, state.sync),
                                                 state.run(state.store.list))
        workers = await state.workers()
        return {"status": "ok", "disk": d, "jobs": counts, "models": len(models),
                "workers": [w.model_dump() for w in workers]}

    @app.get("/metrics", response_class=Response, responses={**METRICS_DOC, **errors.documented(503)})
    async def metrics() -> Response:
        def snapshot() -> dict[str, Any]:
            usage = shutil.disk_usage(settings.artifacts_dir)
            return {"stats": jobs.stats(state.sync), "counts": jobs.counts(state.sync),
                    "models": len(state.store.list()), "disk_free": usage.free, "disk_total": usage.total}

        body = state.metrics.render(await state.run(snapshot))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- models: read
    @app.get("/models", responses=errors.documented(503))
    async def list_models() -> dict[str, Any]:
        def read() -> list[tuple[Manifest, bool]]:
            return [(m, state.store.is_bundled(m.name)) for m in state.store.list()]

        found = await state.run(read)
        serving = await state.serving()
        data = [ModelView.of(m, bundled, serving.get(m.name, [])).model_dump(exclude={"manifest"})
                for m, bundled in found]
        return {"object": "list", "data": data}

    @app.get("/models/search", responses=errors.documented(400, 502, 503))
    async def search(q: str = Query(min_length=1, max_length=100), limit: int = Query(20, ge=1, le=100)
                     ) -> dict[str, Any]:
        from huggingface_hub import HfApi, constants

        endpoint = (settings.hf_endpoint or constants.ENDPOINT).rstrip("/")

        def go() -> list[dict[str, Any]]:
            api = HfApi(endpoint=endpoint, token=settings.hf_token or None)
            out = []
            for m in api.list_models(search=q, pipeline_tag="text-generation", sort="downloads", limit=limit):
                out.append({"id": m.id, "object": "hub.model", "downloads": m.downloads, "likes": m.likes,
                            "pipeline_tag": m.pipeline_tag, "tags": list(m.tags or [])[:20],
                            "last_modified": m.last_modified.isoformat() if m.last_modified else None})
            return out

        try:
            data = await asyncio.wait_for(state.run(go), 30)
        except TimeoutError:
            raise unavailable(f"the Hub at {endpoint} did not answer within 30 s", 5, "hub_timeout") from None
        except Exception as e:
            msg = str(hub_error(e, endpoint, q))
            if msg.startswith("cannot reach"):
                raise unavailable(msg, 10, "hub_unreachable") from None
            raise APIError(502, msg, "upstream_error", None, "hub_error") from None
        return {"object": "list", "data": data}

    @app.get("/models/jobs", responses=errors.documented(400, 503))
    async def list_jobs(limit: int = Query(50, ge=1, le=200)) -> dict[str, Any]:
        def go() -> list[dict[str, Any]]:
            return [jobs.view(j, settings.job_stale_seconds).model_dump() for j in jobs.recent(state.sync, limit)]

        return {"object": "list", "data": await state.run(go)}

    @app.get("/models/jobs/{job_id}", response_model=jobs.JobView, responses=errors.documented(404, 503))
    async def get_job(job_id: str) -> dict[str, Any]:
        v = await state.job_view(job_id)
        if v is None:
            raise _job_not_found(job_id)
        return v.model_dump()

    @app.get("/models/jobs/{job_id}/stream", responses={**PROGRESS_STREAM, **errors.documented(404, 503)})
    async def job_stream(job_id: str) -> Response:
        v = await state.job_view(job_id)
        if v is None:
            raise _job_not_found(job_id)
        return StreamingResponse(stream_job(job_id), media_type="application/x-ndjson")

    @app.get("/models/{name}", responses=errors.documented(400, 404, 503))
    async def get_model(name: str) -> dict[str, Any]:
        validate_name(name)
        m: Manifest | None = await state.run(state.store.manifest, name)
        if m is None:
            raise errors.model_not_found(name)
        bundled = await state.run(state.store.is_bundled, name)
        serving = await state.serving()
        return ModelView.of(m, bundled, serving.get(name, []), full=True).model_dump()

    # ---------------------------------------------------------------- models: mutate
    @app.post("/models/pull", status_code=202, dependencies=admin,
              responses={200: {**JOB_DOC[202], "description": "The same pull was already running: its job"},
                         **JOB_DOC, **errors.documented(400, 401, 409, 413, 429, 503)})
    async def pull(req: PullRequest) -> Response:
        try:
            validate_repo_id(req.repo_id)
        except PullError as e:
            raise errors.bad_request(str(e), "repo_id", "invalid_repo_id") from None
        try:
            validate_revision(req.revision)
        except PullError as e:
            raise errors.bad_request(str(e), "revision", "invalid_revision") from None
        name = req.name or req.repo_id.rsplit("/", 1)[-1]
        await check_new_name(name)
        params = {"repo_id": req.repo_id, "revision": req.revision, "name": name}
        try:
            return job_response(await state.enqueue("pull", [name], params), req.stream)
        except APIError:
            # The same pull is already running: attach to it (200, like Ollama) instead of failing.
            holder = await state.run(state.sync.get, keys.manager_lock_key(name))
            running = await state.job_view(holder.decode()) if holder else None
            if running is None or running.kind != "pull" or running.params != params or running.done:
                raise
            return job_response(running, req.stream, status=200)

    @app.post("/models/import", status_code=202, dependencies=admin, openapi_extra=IMPORT_BODY_DOC,
              responses={**JOB_DOC, **errors.documented(400, 401, 409, 413, 415, 429, 503)})
    async def import_model(request: Request, name: str | None = Query(None, max_length=128),
                           stream: bool = False) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            raw = await _read_limited(request, JSON_BODY_LIMIT)
            try:
                body = ImportPathRequest.model_validate_json(raw)
            except ValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                loc = ".".join(str(p) for p in first.get("loc", ())) or None
                raise errors.bad_request(f"Invalid request: {first.get('msg', 'invalid body')}", loc) from None
            await check_new_name(body.name)
            try:
                src: Path = await state.run(importer.resolve_local, settings.import_dir, body.path)
                if src.is_file():
                    await state.run(importer.check_tar, src, settings.max_upload_bytes)
            except InstallError as e:
                raise errors.bad_request(str(e), "path", "invalid_path") from None
            params = {"name": body.name, "source": str(src), "label": body.path, "delete_source": False}
            return job_response(await state.enqueue("import", [body.name], params), body.stream)
        if ctype not in TAR_TYPES:
            raise APIError(415, "Send a tarball (Content-Type: application/x-tar or application/gzip, with ?name=) "
                           "or JSON {\"path\", \"name\"} for a directory below IMPORT_DIR",
                           "invalid_request_error", None, "unsupported_media_type")
        if not name:
            raise errors.bad_request("Query parameter 'name' is required with a tarball upload", "name")
        await check_new_name(name)
        upload = (await state.run(state.store.tmp_dir)) / f"upload-{uuid.uuid4().hex}.tar"
        try:
            await _receive_to_file(request, upload, settings.max_upload_bytes)
            try:
                await state.run(importer.check_tar, upload, settings.max_upload_bytes)
            except InstallError as e:
                raise errors.bad_request(str(e), "file", "invalid_archive") from None
            params = {"name": name, "source": str(upload), "label": "upload", "delete_source": True}
            v = await state.enqueue("import", [name], params)
        except BaseException:
            await state.run(_unlink, upload)
            raise
        return job_response(v, stream)

    @app.delete("/models/{name}", dependencies=admin, responses=errors.documented(400, 401, 403, 404, 409, 503))
    async def delete_model(name: str, force: bool = False) -> dict[str, Any]:
        validate_name(name)
        path = await state.run(state.store.find, name)
        if path is None:
            raise errors.model_not_found(name)
        if await state.run(state.store.is_bundled, name):
            raise APIError(403, f"'{name}' is bundled with the code (BUNDLED_MODELS_DIR) and cannot be deleted",
                           "permission_error", "model", "model_bundled")
        workers = (await state.serving()).get(name, [])
        if workers and not force:
            raise errors.conflict(f"'{name}' is being served by {', '.join(workers)}; unload it first or "
                                  "delete with ?force=true", "model_in_use")
        if workers:
            await state.publish(ControlMessage(action="unload", model=name))
        await state.run(_remove_model, state.store, path)
        return {"id": name, "object": "model", "deleted": True, "unloaded_from": workers}

    @app.post("/models/{name}/optimize", status_code=202, dependencies=admin,
              responses={**JOB_DOC, **errors.documented(400, 401, 404, 409, 413, 429, 503)})
    async def optimize(name: str, req: OptimizeRequest) -> Response:
        validate_name(name)
        try:
            check_passes(req.passes)
            outputs = [output_name(name, p) for p in req.passes]
        except (OptimizeError, ValueError) as e:
            raise errors.bad_request(str(e), "passes", "invalid_passes") from None
        if await state.run(state.store.find, name) is None:
            raise errors.model_not_found(name)
        for out in outputs:
            await check_new_name(out, "passes")
        try:
            await state.run(check_request, state.store, name, req.passes)
        except OptimizeError as e:
            raise errors.bad_request(str(e), "model", "invalid_source") from None
        params = {"name": name, "passes": req.passes, "max_perplexity_ratio": req.max_perplexity_ratio,
                  "min_top1_agreement": req.min_top1_agreement}
        return job_response(await state.enqueue("optimize", outputs, params), req.stream)

    async def control(action: str, name: str, req: ControlRequest | None) -> JSONResponse:
        validate_name(name)
        if action == "load" and await state.run(state.store.find, name) is None:
            raise errors.model_not_found(name)
        msg = ControlMessage(action=action, model=name, worker_id=req.worker_id if req else None)  # type: ignore[arg-type]
        receivers = await state.publish(msg)
        return JSONResponse({"object": "model.control", **msg.model_dump(), "receivers": receivers}, status_code=202)

    @app.post("/models/{name}/load", status_code=202, dependencies=admin, responses=CONTROL_ERRORS)
    async def load(name: str, req: ControlRequest | None = None) -> JSONResponse:
        return await control("load", name, req)

    @app.post("/models/{name}/unload", status_code=202, dependencies=admin, responses=CONTROL_ERRORS)
    async def unload(name: str, req: ControlRequest | None = None) -> JSONResponse:
        return await control("unload", name, req)

    return app


async def pull_on_start(state: State, timeout: float = 120.0) -> None:
    """PULL_ON_START: queue a pull for each listed repo whose model is not in the volume yet.

    Waits (with backoff, up to ``timeout``) for Redis; a repo already being pulled is left alone; an
    offline Hub makes the job fail with its usual one-line error, and the server runs on regardless.
    """
    repos = [r.strip() for r in state.settings.pull_on_start.split(",") if r.strip()]
    delay, deadline = 0.5, time.monotonic() + timeout
    while True:
        try:
            await state.redis.ping()
            break
        except redis.RedisError as e:
            if time.monotonic() > deadline:
                log.warning("PULL_ON_START skipped: Redis unavailable (%s)", e)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    for repo_id in repos:
        name = repo_id.rsplit("/", 1)[-1]
        try:
            validate_repo_id(repo_id)
            validate_name(name)
            if await state.run(state.store.find, name) is not None:
                continue
            v = await state.enqueue("pull", [name], {"repo_id": repo_id, "revision": "main", "name": name})
            log.info("PULL_ON_START: pulling %s as %s (job %s)", repo_id, name, v.id)
        except APIError as e:
            log.info("PULL_ON_START: %s not queued: %s", repo_id, e.message)
        except (PullError, ValueError) as e:
            log.warning("PULL_ON_START: ignoring %r: %s", repo_id, e)


def _unlink(p: Path) -> None:
    p.unlink(missing_ok=True)


def _remove_model(store: ArtifactStore, path: Path) -> None:
    """Rename out of sight first (readers see the model or nothing), then delete at leisure."""
    trash = store.tmp_dir() / f"trash-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # a concurrent delete won
        raise errors.model_not_found(path.name) from None
    shutil.rmtree(trash, ignore_errors=True)


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _receive_to_file(request: Request, path: Path, limit: int) -> None:
    """Stream the request body to ``path`` (writes on a thread, 1 MiB at a time), 413 past ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.too_large(limit)
    size, buf = 0, bytearray()
    fh = await asyncio.to_thread(open, path, "wb")
    try:
        write: Callable[[bytes], Awaitable[int]] = lambda b: asyncio.to_thread(fh.write, b)  # noqa: E731
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.too_large(limit)
            buf += chunk
            if len(buf) >= 1 << 20:
                await write(bytes(buf))
                buf.clear()
        if buf:
            await write(bytes(buf))
        if size == 0:
            raise errors.bad_request("The request body is empty: send the tarball as the body", "file")
    finally:
        await asyncio.to_thread(fh.close)

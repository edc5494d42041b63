"""Operational routes, always open (no API key): ``/health``, ``/ready``, ``/metrics``, ``/system``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from gateway.deps import get_gateway
from gateway.service import Gateway
from protocol import keys
from protocol.errors import ErrorResponse, error_body

router = APIRouter(tags=["System"])

MAX_QUEUES = 256  # job streams listed by /system


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse,
                                     "description": "Not ready: the OpenAI error object plus status and checks"}})
async def ready(gw: Gateway = Depends(get_gateway)) -> Any:
    """Readiness: Redis answers, the event subscription is live, a live worker serves the default model (and
    the default model's tokenizer preload has ended)."""
    model = gw.settings.default_model
    checks: dict[str, Any] = {"redis": False, "events_subscribed": gw.dispatcher.subscribed.is_set(),
                              "default_model": model, "workers_for_default_model": 0, "draining": gw.draining,
                              "tokenizer_warmed_up": gw.warmed_up}
    problem = None
    try:
        await asyncio.wait_for(gw.redis.ping(), 2.0)
        checks["redis"] = True
        checks["workers_for_default_model"] = len(await gw.workers.serving(model))
    except (RedisError, OSError, TimeoutError) as e:
        problem = f"Redis is unreachable ({type(e).__name__})"
    if problem is None:
        if gw.draining:
            problem = "the gateway is shutting down"
        elif not checks["tokenizer_warmed_up"]:
            problem = f"still loading the tokenizer of '{model}'"
        elif not checks["events_subscribed"]:
            problem = "not subscribed to the event channel yet"
        elif not checks["workers_for_default_model"]:
            problem = f"no live worker serves the default model '{model}'"
    if problem:
        body = error_body(f"Not ready: {problem}", "service_unavailable", None, "not_ready")
        return JSONResponse({**body, "status": "not ready", "checks": checks}, status_code=503,
                            headers={"Retry-After": "2"})
    return {"status": "ready", "checks": checks}


@router.get("/metrics", response_class=Response)
async def metrics(gw: Gateway = Depends(get_gateway)) -> Response:
    """Prometheus exposition format."""
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _queue_depth(gw: Gateway, stream: str) -> dict[str, Any]:
    """One model's stream: entries no worker has taken yet (``waiting``), taken but not acked (``in_flight``)."""
    length = int(await gw.redis.xlen(stream))
    waiting, in_flight = length, 0
    if not length:  # also a stream that does not exist yet (XINFO would fail on it)
        return {"waiting": 0, "in_flight": 0, "length": 0}
    for g in await gw.redis.xinfo_groups(stream):
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) != keys.JOBS_GROUP:
            continue
        in_flight = int(g.get("pending") or 0)
        lag = g.get("lag")
        if isinstance(lag, int):
            waiting = lag
        else:  # Redis < 7: count what follows the group's last-delivered id (bounded)
            last = g.get("last-delivered-id")
            last = last.decode() if isinstance(last, bytes) else str(last)
            cap = gw.settings.queue_capacity + 1
            waiting = len(await gw.redis.xrange(stream, min="(" + last, max="+", count=cap))
    return {"waiting": waiting, "in_flight": in_flight, "length": length}


@router.get("/system")
async def system(gw: Gateway = Depends(get_gateway)) -> dict[str, Any]:
    """What an operator's dashboard shows: Redis, live workers (heartbeats) and queue depth per model.

    Always 200: when Redis is unreachable, ``redis.ok`` is false and the lists are empty.
    """
    out: dict[str, Any] = {"gateway_id": gw.settings.gateway_id, "default_model": gw.settings.default_model,
                           "queue_capacity": gw.settings.queue_capacity, "draining": gw.draining,
                           "time": time.time(), "redis": {"ok": False}, "workers": [], "queues": []}
    try:
        start = time.perf_counter()
        await asyncio.wait_for(gw.redis.ping(), 2.0)
        ping_ms = (time.perf_counter() - start) * 1000
        info = await asyncio.wait_for(gw.redis.info(), 2.0)
        out["redis"] = {"ok": True, "ping_ms": round(ping_ms, 2), "version": info.get("redis_version"),
                        "uptime_seconds": info.get("uptime_in_seconds"),
                        "used_memory_bytes": info.get("used_memory"),
                        "connected_clients": info.get("connected_clients")}
        workers = await gw.workers.live()
        out["workers"] = [w.model_dump() for w in workers]
        models = {m for w in workers for m in w.models}
        prefix = keys.jobs_stream("")
        async for key in gw.redis.scan_iter(match=keys.jobs_stream("*"), count=500, _type="STREAM"):
            models.add((key.decode() if isinstance(key, bytes) else key)[len(prefix):])
            if len(models) >= MAX_QUEUES:
                break
        depths = await asyncio.gather(*(_queue_depth(gw, keys.jobs_stream(m)) for m in sorted(models)),
                                      return_exceptions=True)
        out["queues"] = [{"model": m, **d} for m, d in zip(sorted(models), depths, strict=True)
                         if isinstance(d, dict)]
    except (RedisError, OSError, TimeoutError) as e:
        out["redis"] = {"ok": False, "error": f"Redis is unreachable ({type(e).__name__})"}
    return out

"""Operational routes, always open (no API key): ``/health``, ``/ready``, ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from gateway.deps import get_gateway
from gateway.service import Gateway
from protocol.errors import error_body

router = APIRouter(tags=["System"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready (OpenAI error object plus the checks)"}})
async def ready(gw: Gateway = Depends(get_gateway)) -> Any:
    """Readiness: Redis answers, the event subscription is live, a live worker serves the default model."""
    model = gw.settings.default_model
    checks: dict[str, Any] = {"redis": False, "events_subscribed": gw.dispatcher.subscribed.is_set(),
                              "default_model": model, "workers_for_default_model": 0, "draining": gw.draining}
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

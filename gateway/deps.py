"""FastAPI dependencies: the shared ``Gateway`` and the caller's identity (API-key auth).

Both are ``async def``: FastAPI runs plain ``def`` dependencies on its thread pool, a hop per call.
"""

from __future__ import annotations

from fastapi import Header, Request

from gateway.service import Gateway
from protocol.errors import APIError


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def authenticate(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> str:
    """The caller's identity for per-key limits; a 401 when API keys are configured and this is not one."""
    gw: Gateway = request.app.state.gateway
    client = request.client.host if request.client else "unknown"
    try:
        return gw.admission.authenticate(authorization, client)
    except APIError:
        gw.metrics.rejections.labels("auth").inc()
        raise

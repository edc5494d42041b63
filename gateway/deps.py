"""FastAPI dependencies: the shared ``Gateway`` and the caller's identity (API-key auth).

Both are ``async def``: FastAPI runs plain ``def`` dependencies on its thread pool, a hop per call.
"""

from __future__ import annotations

from fastapi import Header, Request

from gateway.service import Gateway


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def authenticate(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> str:
    """The caller's identity for per-key limits; a 401 when API keys are configured and this is not one,
    a 503 while the gateway drains."""
    gw: Gateway = request.app.state.gateway
    client = request.client.host if request.client else "unknown"
    return gw.admission.authenticate(authorization, client)

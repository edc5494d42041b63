"""Exception handlers: every error leaves the gateway as ``{"error": {"message","type","param","code"}}``.

Validation errors (wrong types, out-of-range values, malformed JSON, a body that is not JSON) are
400 ``invalid_request_error`` like OpenAI's API, not FastAPI's default 422. Unknown routes are 404,
wrong methods 405, Redis being down 503 with ``Retry-After``; an unexpected exception is a 500
``server_error`` and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.errors import APIError, error_body, unavailable

log = logging.getLogger("gateway.errors")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def timeout_error(message: str) -> APIError:
    return APIError(504, message, "timeout", None, "request_timeout")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def describe_validation(errors: Sequence[dict[str, Any]]) -> APIError:
    """One readable 400 from pydantic's error list (the first error, and how many more there are)."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        pos = loc[1] if len(loc) > 1 else "?"
        return bad_request(f"Request body is not valid JSON: {detail} (at character {pos})",
                           code="invalid_json")
    if loc == ("body",) and kind == "missing":
        return bad_request("Request body is required: a JSON object", code="invalid_json")
    if loc == ("body",) and isinstance(first.get("input"), bytes | str):
        return bad_request("Request body must be a JSON object sent with Content-Type: application/json",
                           code="invalid_json")
    param = _param(loc)
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return bad_request(f"Invalid request: {where}{msg}{more}", param=param)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(describe_validation(list(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        err = APIError(404, f"Unknown route: {request.method} {request.url.path}", "not_found_error",
                       None, "unknown_route")
    elif status == 405:
        err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                       "invalid_request_error", None, "method_not_allowed")
    elif status == 400 and "parsing the body" in str(exc.detail):  # FastAPI: bad UTF-8, too deep
        err = bad_request("Request body could not be parsed as JSON (it must be UTF-8, and not nested too deeply)",
                          code="invalid_json")
    else:
        err = APIError(status, str(exc.detail), "invalid_request_error" if status < 500 else "server_error")
    err.headers = dict(exc.headers or {})
    return error_response(err)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis error on %s: %s", request.url.path, exc)
    return error_response(unavailable(f"The job queue (Redis) is unavailable: {type(exc).__name__}",
                                      retry_after=2, code="redis_unavailable"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("Internal server error", "server_error", None, "internal_error"),
                        status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _unexpected)

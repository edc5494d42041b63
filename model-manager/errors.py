"""Every error leaves the model-manager in the OpenAI shape: ``{"error": {message, type, param, code}}``.

Validation problems are 400s (like OpenAI's API, not FastAPI's 422), unknown routes 404, wrong
methods 405, Redis being down 503 with ``Retry-After``, anything unexpected a logged 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.artifacts import InvalidModelName
from protocol.errors import APIError, document_validation_errors_as_400, error_body, error_docs, unavailable

log = logging.getLogger("model_manager.errors")


ERROR_DESCRIPTIONS = {
    400: "Invalid request: wrong types or values, malformed JSON, an invalid model name",
    401: "Missing or wrong admin API key (when ADMIN_API_KEY is set)",
    403: "The model is bundled with the code and cannot be deleted",
    404: "Unknown model or job",
    409: "The name is taken, a job for it is running, or the model is being served",
    413: "Request body too large",
    415: "Unsupported Content-Type",
    429: "Too many jobs waiting (see Retry-After)",
    502: "The Hub answered with an error",
    503: "Redis or the Hub is unavailable (see Retry-After)",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for a route that can answer these error statuses (in the OpenAI error shape)."""
    return error_docs({s: ERROR_DESCRIPTIONS[s] for s in statuses})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def conflict(message: str, code: str) -> APIError:
    return APIError(409, message, "conflict_error", None, code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist in the artifact volume", "not_found_error",
                    "model", "model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes", "invalid_request_error",
                    None, "request_too_large")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _invalid_name(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(bad_request(str(exc), "name", "invalid_model_name"))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return _error_response(bad_request("invalid request"))
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return _error_response(bad_request("Request body is not valid JSON", code="invalid_json"))
    if loc == ("body",):
        return _error_response(bad_request("Request body must be a JSON object (Content-Type: application/json)",
                                           code="invalid_json"))
    param = _param(loc)
    where = f"'{param}': " if param else ""
    return _error_response(bad_request(f"Invalid request: {where}{first.get('msg', 'invalid value')}", param))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err = APIError(404, f"Unknown route: {request.method} {request.url.path}", "not_found_error",
                       None, "unknown_route")
    elif exc.status_code == 405:
        err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                       "invalid_request_error", None, "method_not_allowed")
    else:
        err = APIError(exc.status_code, str(exc.detail),
                       "invalid_request_error" if exc.status_code < 500 else "server_error")
    err.headers = dict(exc.headers or {})
    return _error_response(err)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis error on %s: %s", request.url.path, exc)
    return _error_response(unavailable(f"Redis is unavailable: {type(exc).__name__}", 2, "redis_unavailable"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("Internal server error", "server_error", None, "internal_error"), status_code=500)


def install(app: FastAPI) -> None:
    document_validation_errors_as_400(app)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InvalidModelName, _invalid_name)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _unexpected)

"""The OpenAI error object, used by every HTTP service for every error, and how OpenAPI documents it.

``{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error response: OpenAI's error object."""

    error: ErrorObject


class APIError(Exception):
    """An error with its HTTP status, rendered in the OpenAI shape by each service's handler."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, "not_found_error", param, "model_not_found" if param == "model" else None)


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(429, message, "server_overloaded", None, "queue_full",
                    headers={"Retry-After": str(retry_after)})


def unavailable(message: str, retry_after: int = 2, code: str = "unavailable") -> APIError:
    return APIError(503, message, "service_unavailable", None, code,
                    headers={"Retry-After": str(retry_after)})


def error_docs(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting each status (with its description) as an ``ErrorResponse``."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}


def document_validation_errors_as_400(app: Any) -> None:
    """FastAPI documents a 422 ``HTTPValidationError`` on every operation with parameters or a body; our
    services answer invalid requests with a 400 ``ErrorResponse``. Make ``app``'s OpenAPI document say so."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema: dict[str, Any] = build()
        for operations in schema.get("paths", {}).values():
            for op in operations.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {"description": "Invalid request", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

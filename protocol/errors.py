"""The OpenAI error object, used by every HTTP service for every error.

``{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}``
"""

from __future__ import annotations

from typing import Any


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

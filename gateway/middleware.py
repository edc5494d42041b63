"""Request context: the ``X-Request-ID`` header, the request-body limit, lenient JSON on native routes.

- ``X-Request-ID``: a client's value (1-128 of ``A-Za-z0-9._:-``) is kept, otherwise one is made; it
  is returned on every response and kept in ``scope["spindle.request_id"]`` for logs.
- Body limit: a body over ``MAX_REQUEST_BYTES`` gets a 413 in the OpenAI error shape, decided from
  ``Content-Length`` when present, else while reading (the body is read here, bounded, and replayed
  to the app; a client that disconnects mid-body ends the request).
- The native routes (``/generate``, ``/stream``, ``/completion``) are used with ``curl -d '{...}'``,
  which sends ``application/x-www-form-urlencoded``: there a JSON-looking body is treated as JSON.
  The OpenAI routes keep FastAPI's strict ``application/json`` check.
"""

from __future__ import annotations

import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.errors import error_body

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
LENIENT_JSON_PATHS = frozenset({"/generate", "/stream", "/completion"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_id_of(scope: Scope) -> str:
    return scope.get("spindle.request_id") or uuid.uuid4().hex


def arrival_of(scope: Scope) -> float:
    """``time.monotonic()`` when the request arrived."""
    return scope.get("spindle.arrival") or time.monotonic()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope["spindle.request_id"] = rid
        scope["spindle.arrival"] = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send_with_id)
            return

        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await self._reject(scope, receive, send_with_id, 400, "Invalid Content-Length header")
                return
            if int(length) > self.max_body_bytes:
                await self._too_large(scope, receive, send_with_id)
                return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send_with_id)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        if scope["path"] in LENIENT_JSON_PATHS and body.lstrip()[:1] in (b"{", b"["):
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype in ("", "application/x-www-form-urlencoded", "text/plain"):
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope["headers"] = [*headers, (b"content-type", b"application/json")]

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._reject(scope, receive, send, 413,
                           f"Request body too large: the limit is {self.max_body_bytes} bytes",
                           code="request_too_large")

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      code: str | None = None) -> None:
        response = JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)

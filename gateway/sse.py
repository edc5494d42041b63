"""Server-sent events: encoding and a streaming response that always closes its generator.

Every payload is JSON (or the literal ``[DONE]``), so a newline inside a token is escaped as ``\\n``
and cannot break the ``data:`` framing.
An ``id:`` line (OpenAI streams: ``<request_id>:<position>``, gateway/resume.py) comes first in its
event, so a stored stream splits into events at every blank line.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data(obj: Any, event_id: str | None = None) -> str:
    """One ``data:`` event carrying ``obj`` as JSON, with an ``id:`` line when ``event_id`` is given."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {dumps(obj)}\n\n"


def done(event_id: str | None = None) -> str:
    """The closing ``data: [DONE]``, with an ``id:`` line when ``event_id`` is given."""
    return DONE if event_id is None else f"id: {event_id}\n{DONE}"


def event(name: str, obj: Any) -> str:
    """A named event (``event: name``) carrying ``obj`` as JSON."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n"


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose body generator is closed however the response ends.

    Starlette stops iterating when the client disconnects but leaves a suspended generator to the
    garbage collector; closing it here runs its ``finally`` (which cancels the job) at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content, status_code: int = 200, headers: dict[str, str] | None = None):
        super().__init__(content, status_code=status_code, headers={**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

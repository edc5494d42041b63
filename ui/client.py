"""Every HTTP call the UI makes, in one place: the gateway (OpenAI API, /ready, /metrics, /system) and the
model-manager (models, jobs, search, import, optimize, load/unload, delete, status).

No Streamlit here, so it is testable on its own. Every failure becomes a ``ServiceError`` whose
``message`` a person can read (the service's own OpenAI-shaped error message, or what went wrong on the
way: not reachable, timed out); pages show ``message`` and never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx

CONNECT_TIMEOUT = 5.0
# Calls that answer at once (lists, status, control messages).
SHORT_TIMEOUT = 15.0
# Gaps allowed between two chunks of a stream (tokens, job progress). The gateway ends a stalled
# generation itself after EVENT_TIMEOUT (60 s by default) with an error event, so this is a backstop.
STREAM_READ_TIMEOUT = 120.0
# Hub search goes through the model-manager, which gives the Hub 30 s.
SEARCH_TIMEOUT = 40.0
UPLOAD_TIMEOUT = 600.0
MAX_JOB_LINE = 1 << 20


class ServiceError(Exception):
    """A call that failed; ``message`` is for people, the rest for code."""

    def __init__(self, message: str, *, service: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, kind: str = "http"):
        super().__init__(message)
        self.message = message
        self.service = service
        self.status = status
        self.code = code
        self.retry_after = retry_after
        # "unreachable", "timeout", "overloaded", "auth", "http" (any other error answer) or "stream"
        self.kind = kind


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return float(headers.get("retry-after", ""))
    except ValueError:
        return None


def error_from_body(service: str, status: int, body: Any, headers: httpx.Headers | None = None) -> ServiceError:
    """A ServiceError for an error answer (OpenAI shape ``{"error": {"message", "code", ...}}`` or anything)."""
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}" + (f": {str(body)[:200]}" if body else "")
    retry = _retry_after(headers) if headers is not None else None
    if status == 429:
        wait = f" Try again in {retry:g} s." if retry else " Try again shortly."
        return ServiceError(f"The server is overloaded: {message.rstrip('. ')}.{wait}", service=service,
                            status=status, code=code, retry_after=retry, kind="overloaded")
    if status in (401, 403) and code in ("invalid_api_key", "missing_api_key"):
        var = "ADMIN_API_KEY" if service == "model-manager" else "API_KEY"
        return ServiceError(f"The {service} refused the request: {message} (set {var} for the UI)",
                            service=service, status=status, code=code, kind="auth")
    if status == 504:
        return ServiceError(f"Timed out: {message}", service=service, status=status, code=code, kind="timeout")
    return ServiceError(message, service=service, status=status, code=code, retry_after=retry)


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:500]


class _Service:
    name = "service"

    def __init__(self, base_url: str, api_key: str = ""):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                 timeout=httpx.Timeout(SHORT_TIMEOUT, connect=CONNECT_TIMEOUT),
                                 limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))

    def close(self) -> None:
        self.http.close()

    def _transport_error(self, e: httpx.HTTPError, timeout: float | None = None) -> ServiceError:
        if isinstance(e, httpx.TimeoutException):
            what = "did not connect" if isinstance(e, httpx.ConnectTimeout) else "did not answer"
            limit = f" within {timeout:g} s" if timeout else " in time"
            return ServiceError(f"Timed out: the {self.name} at {self.base_url} {what}{limit}.",
                                service=self.name, kind="timeout")
        if isinstance(e, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError):
            reason = str(e) or type(e).__name__
            return ServiceError(f"Cannot reach the {self.name} at {self.base_url} ({reason}). Is it running?",
                                service=self.name, kind="unreachable")
        return ServiceError(f"Request to the {self.name} failed: {type(e).__name__}: {e}", service=self.name,
                            kind="unreachable")

    def _send(self, method: str, path: str, *, timeout: float = SHORT_TIMEOUT, ok_statuses: tuple[int, ...] = (),
              **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT), **kw)
        except httpx.HTTPError as e:
            raise self._transport_error(e, timeout) from None
        if r.status_code >= 400 and r.status_code not in ok_statuses:
            raise error_from_body(self.name, r.status_code, _json_or_text(r), r.headers)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._send(method, path, **kw)
        body = _json_or_text(r)
        if not isinstance(body, dict | list):
            raise ServiceError(f"The {self.name} sent an unexpected answer to {method} {path}: {str(body)[:200]}",
                               service=self.name, status=r.status_code)
        return body

    @contextmanager
    def _stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """An open streaming response (2xx); closing it (leaving the block, however) closes the connection."""
        timeout = httpx.Timeout(STREAM_READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        try:
            with self.http.stream(method, path, timeout=timeout, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_from_body(self.name, r.status_code, _json_or_text(r), r.headers)
                yield r
        except httpx.HTTPError as e:
            raise self._transport_error(e, STREAM_READ_TIMEOUT) from None


# ------------------------------------------------------------------------------------------ gateway
@dataclass
class ChatResult:
    """What one streamed reply measured; filled in while the stream runs."""

    text: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    ended_at: float | None = None
    chunks: int = 0
    completion_tokens: int | None = None  # from the usage chunk, when the stream got that far
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    model: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's count, else the content chunks seen (one token each, or more)."""
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first one over the time since the first one."""
        if self.first_token_at is None or self.tokens < 2:
            return None
        dt = (self.ended_at or time.monotonic()) - self.first_token_at
        return (self.tokens - 1) / dt if dt > 0 else None


class GatewayClient(_Service):
    name = "gateway"

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` cards (``id``, ``served``, ``context_length``, ...)."""
        body = self._json("GET", "/v1/models")
        return [m for m in body.get("data", []) if isinstance(m, dict) and "id" in m]

    def ready(self) -> dict[str, Any]:
        """``/ready``'s body, ready or not (``status`` is "ready" or "not ready")."""
        return self._json("GET", "/ready", timeout=5.0, ok_statuses=(503,))

    def metrics_text(self) -> str:
        return self._send("GET", "/metrics", timeout=5.0).text

    def system(self) -> dict[str, Any]:
        """``/system``: Redis status, live workers, queue depth per model."""
        return self._json("GET", "/system", timeout=5.0)

    def chat_body(self, model: str, messages: list[dict[str, str]], *, temperature: float, top_p: float,
                  max_tokens: int) -> dict[str, Any]:
        return {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}

    def chat(self, model: str, messages: list[dict[str, str]], *, on_text: Callable[[str], None],
             on_wait: Callable[[], None] | None = None, wait_every: float = 0.25, temperature: float = 0.7,
             top_p: float = 1.0, max_tokens: int = 256, result: ChatResult | None = None) -> ChatResult:
        """Stream a chat completion: ``on_text(piece)`` for every piece of text as it arrives, and
        ``on_wait()`` every ``wait_every`` seconds without one (waiting in the queue, prefill).

        Whatever a callback raises ends the stream at once, even while no token is arriving: the HTTP
        connection is closed and the gateway cancels the job on the worker. (Streamlit interrupts a
        script run this way when the user presses Stop.) Returns ``result``, filled in as the stream
        ran; an error answer, or one the gateway sends inside the stream, raises ServiceError.
        """
        res = result if result is not None else ChatResult()
        res.model = model
        body = self.chat_body(model, messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        try:
            asyncio.run(self._chat(body, res, on_text, on_wait, wait_every))
        finally:
            if res.ended_at is None:
                res.ended_at = time.monotonic()
        return res

    async def _chat(self, body: dict[str, Any], res: ChatResult, on_text: Callable[[str], None],
                    on_wait: Callable[[], None] | None, wait_every: float) -> None:
        timeout = httpx.Timeout(STREAM_READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        try:
            async with (httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout) as http,
                        http.stream("POST", "/v1/chat/completions", json=body) as r):
                if r.status_code >= 400:
                    await r.aread()
                    raise error_from_body(self.name, r.status_code, _json_or_text(r), r.headers)
                pieces = self._pieces(r, res)
                nxt = asyncio.ensure_future(anext(pieces))
                try:
                    while True:
                        done, _ = await asyncio.wait({nxt}, timeout=wait_every)
                        if not done:
                            if on_wait is not None:
                                on_wait()
                            continue
                        try:
                            piece = nxt.result()
                        except StopAsyncIteration:
                            break
                        on_text(piece)
                        nxt = asyncio.ensure_future(anext(pieces))
                finally:
                    if not nxt.done():
                        nxt.cancel()
                        with contextlib.suppress(BaseException):
                            await nxt
                    await pieces.aclose()
        except httpx.HTTPError as e:
            raise self._transport_error(e, STREAM_READ_TIMEOUT) from None

    async def _pieces(self, r: httpx.Response, res: ChatResult) -> AsyncIterator[str]:
        """Server-sent events: ``data:`` lines up to a blank line make one event (other fields are skipped)."""
        data: list[str] = []
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                continue
            if line or not data:
                continue
            event, data = "\n".join(data), []
            if event == "[DONE]":
                break
            for piece in self._apply(event, res):
                yield piece
        res.ended_at = time.monotonic()

    def _apply(self, data: str, res: ChatResult) -> list[str]:
        """Apply one chunk (JSON text) to ``res``; the content pieces it carried."""
        try:
            obj = json.loads(data)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        if "error" in obj:
            err = error_from_body(self.name, 500, obj)
            err.kind = "timeout" if err.code == "timeout" or "timed out" in err.message.lower() else "stream"
            raise err
        usage = obj.get("usage")
        if isinstance(usage, dict):
            res.completion_tokens = usage.get("completion_tokens")
            res.prompt_tokens = usage.get("prompt_tokens")
        out = []
        for choice in obj.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                if res.first_token_at is None:
                    res.first_token_at = time.monotonic()
                res.chunks += 1
                res.text += text
                out.append(text)
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
        return out


# ------------------------------------------------------------------------------------ model-manager
FINAL_STAGES = ("ready", "failed")


def job_fraction(job: dict[str, Any]) -> float:
    """0..1 for a progress bar: bytes (or the optimizer's thousandths) done; 1.0 once ready."""
    if job.get("stage") == "ready":
        return 1.0
    total = job.get("bytes_total") or 0
    done = job.get("bytes_done") or 0
    return max(0.0, min(1.0, done / total)) if total else 0.0


def job_done(job: dict[str, Any]) -> bool:
    return job.get("stage") in FINAL_STAGES or bool(job.get("stalled"))


class ManagerClient(_Service):
    name = "model-manager"

    def status(self) -> dict[str, Any]:
        """Disk, rq job counts, model count and live workers."""
        return self._json("GET", "/status", timeout=5.0)

    def models(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/models").get("data", []))

    def model(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/models/{_seg(name)}")

    def search(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        return list(self._json("GET", "/models/search", params={"q": query, "limit": limit},
                               timeout=SEARCH_TIMEOUT).get("data", []))

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(self._json("GET", "/models/jobs", params={"limit": limit}).get("data", []))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/models/jobs/{_seg(job_id)}")

    @contextmanager
    def follow_job(self, job_id: str) -> Iterator[Iterator[dict[str, Any]]]:
        """The job's live progress (NDJSON, one view per change) until it is ready, failed or stalled."""
        with self._stream("GET", f"/models/jobs/{_seg(job_id)}/stream") as r:
            yield self._views(r)

    def _views(self, r: httpx.Response) -> Iterator[dict[str, Any]]:
        try:
            for line in r.iter_lines():
                if not line.strip() or len(line) > MAX_JOB_LINE:
                    continue
                try:
                    view = json.loads(line)
                except ValueError:
                    continue
                if isinstance(view, dict) and "error" in view and "id" not in view:
                    raise error_from_body(self.name, 404, view)
                if isinstance(view, dict):
                    yield view
        except httpx.HTTPError as e:
            raise self._transport_error(e, STREAM_READ_TIMEOUT) from None

    def pull(self, repo_id: str, revision: str = "main", name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"repo_id": repo_id, "revision": revision or "main"}
        if name:
            body["name"] = name
        return self._json("POST", "/models/pull", json=body)

    def import_path(self, path: str, name: str) -> dict[str, Any]:
        return self._json("POST", "/models/import", json={"path": path, "name": name})

    def import_tarball(self, data: BinaryIO | bytes, name: str) -> dict[str, Any]:
        return self._json("POST", "/models/import", params={"name": name}, content=data,
                          headers={"Content-Type": "application/x-tar"}, timeout=UPLOAD_TIMEOUT)

    def optimize(self, name: str, passes: list[str], max_perplexity_ratio: float | None = None,
                 min_top1_agreement: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"passes": passes}
        if max_perplexity_ratio is not None:
            body["max_perplexity_ratio"] = max_perplexity_ratio
        if min_top1_agreement is not None:
            body["min_top1_agreement"] = min_top1_agreement
        return self._json("POST", f"/models/{_seg(name)}/optimize", json=body)

    def load(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/models/{_seg(name)}/load")

    def unload(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/models/{_seg(name)}/unload")

    def delete(self, name: str, force: bool = False) -> dict[str, Any]:
        return self._json("DELETE", f"/models/{_seg(name)}", params={"force": "true"} if force else None)


def _seg(value: str) -> str:
    """One URL path segment (a model name or job id), so a '/' or '..' in it cannot change the route."""
    from urllib.parse import quote

    return quote(value, safe="")

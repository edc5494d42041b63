"""Native routes for the seeds' clients: ``/generate``, ``/stream`` (SSE) and llama.cpp's ``/completion``.

``/stream`` events: ``event: ttft`` (seconds, a JSON number) before the first token, then one
``data:`` per step whose payload is the JSON-encoded token text (so ``"\\n"`` never breaks framing),
then ``event: done`` with the same summary ``/generate`` returns (without the text); a failure after
the stream started is ``event: error`` with an OpenAI error object.

``/completion`` follows llama.cpp's server: ``{"content", "stop": true, "stop_type", "tokens_predicted",
"tokens_evaluated", "timings", ...}``, or with ``stream: true`` lines ``data: {"content": ..., "stop":
false}`` ending with the full final object (``"stop": true``), without ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway import sse
from gateway.deps import authenticate, get_gateway
from gateway.generation import Generation
from gateway.idempotency import Idempotent, respond_json, submitted
from gateway.middleware import arrival_of, request_id_of
from gateway.openai_format import new_id, usage
from gateway.openai_routes import ERROR_RESPONSES
from gateway.schemas import GenerateRequest, LlamaCompletionRequest
from gateway.service import Gateway
from gateway.tokenization import ModelTokenizer
from protocol.errors import APIError
from protocol.messages import IdempotencyMeta

router = APIRouter(tags=["Native"])
SSE_DOC: dict[int | str, dict[str, Any]] = {200: {"description": "text/event-stream",
                                                  "content": {"text/event-stream": {}}}}


def timings(gen: Generation) -> dict[str, Any]:
    total = gen.elapsed()
    ttft = gen.ttft
    decode = total - ttft if ttft is not None else 0.0
    n = gen.completion_tokens
    return {"ttft_s": ttft, "total_s": total,
            "tokens_per_second": (n - 1) / decode if n > 1 and decode > 0 else None}


def summary(gen: Generation) -> dict[str, Any]:
    return {"id": gen.request_id, "model": gen.model, "finish_reason": gen.finish_reason,
            "usage": usage(gen.prompt_tokens, gen.completion_tokens), "timings": timings(gen)}


async def _start(gw: Gateway, request: Request, identity: str, model: str | None, prompt: str | list[int],
                 requested: int | None, param: str, sampling: Any, kind: Literal["generate", "llama"] = "generate",
                 idem: Idempotent | None = None) -> tuple[ModelTokenizer, Generation] | Response:
    """Plan and submit the job; with an Idempotency-Key, hold it first (or the answer of the request
    that holds it)."""
    tok = await gw.model_for(model)
    prompt_ids = await gw.encode_prompt(tok, prompt)
    max_tokens = gw.plan_max_tokens(tok, len(prompt_ids), requested, param)
    rid = new_id("gen")
    if idem is not None:
        meta = IdempotencyMeta(kind=kind, model=tok.name, prompt_tokens=len(prompt_ids),
                               gateway_id=gw.settings.gateway_id)
        answer = await idem.claim(rid, meta, time.time() + gw.settings.request_timeout)
        if answer is not None:
            return answer
    gen = await submitted(idem, gw.submit(tok=tok, prompt_ids=prompt_ids, params=sampling(max_tokens), request_id=rid,
                                          identity=identity, arrival=arrival_of(request.scope),
                                          client_request_id=request_id_of(request.scope)))
    return tok, gen


@router.post("/generate", response_model=None, responses=ERROR_RESPONSES)
async def generate(body: GenerateRequest, request: Request, gw: Gateway = Depends(get_gateway),
                   identity: str = Depends(authenticate)) -> Response:
    """Generate text for a prompt: ``{"text", "tokens", "finish_reason", "usage", "timings"}``.
    An ``Idempotency-Key`` header makes a retry replay the first answer (docs/api.md)."""
    idem = await Idempotent.open(request, gw, identity)
    if idem is not None and (answer := await idem.existing()) is not None:
        return answer
    started = await _start(gw, request, identity, body.model, body.prompt, body.requested_max_tokens,
                           "max_new_tokens", lambda n: body.sampling(n), idem=idem)
    if isinstance(started, Response):
        return started
    _tok, gen = started
    return await respond_json(idem, request, gen,
                              lambda out: {"text": out.text, "tokens": out.token_ids, **summary(gen)})


async def _token_stream(gen: Generation) -> AsyncIterator[str]:
    try:
        ttft_sent = False
        try:
            async for ev in gen.events():
                if not ttft_sent and gen.ttft is not None:
                    ttft_sent = True
                    yield sse.event("ttft", round(gen.ttft, 6))
                if ev.text:
                    yield sse.data(ev.text)
            yield sse.event("done", summary(gen))
        except APIError as e:
            yield sse.event("error", e.body())
    finally:
        gen.close()


@router.post("/stream", response_model=None, responses={**SSE_DOC, **ERROR_RESPONSES})
async def stream(body: GenerateRequest, request: Request, gw: Gateway = Depends(get_gateway),
                 identity: str = Depends(authenticate)) -> sse.EventStreamResponse:
    """Server-sent events: ``event: ttft``, the tokens as JSON strings, ``event: done`` with a summary."""
    await Idempotent.open(request, gw, identity, stream=True, resumable=False)
    started = await _start(gw, request, identity, body.model, body.prompt, body.requested_max_tokens,
                           "max_new_tokens", lambda n: body.sampling(n))
    assert not isinstance(started, Response)
    return sse.EventStreamResponse(_token_stream(started[1]))


def llama_stop_type(finish_reason: str | None, stop_reason: str | None) -> str:
    if finish_reason == "length":
        return "limit"
    if finish_reason == "stop":
        return "word" if stop_reason else "eos"
    return "none"


def llama_final(gen: Generation, body: LlamaCompletionRequest, content: str, prompt_text: str) -> dict[str, Any]:
    ttft = gen.ttft or 0.0
    decode = max(0.0, gen.elapsed() - ttft)
    n_prompt, n_gen = gen.prompt_tokens, gen.completion_tokens
    stop_type = llama_stop_type(gen.finish_reason, gen.stop_reason)
    return {
        "content": content, "id_slot": 0, "stop": True, "model": gen.model,
        "tokens_predicted": n_gen, "tokens_evaluated": n_prompt, "tokens_cached": 0, "truncated": False,
        "prompt": prompt_text, "stop_type": stop_type, "stopping_word": gen.stop_reason or "",
        "stopped_eos": stop_type == "eos", "stopped_word": stop_type == "word", "stopped_limit": stop_type == "limit",
        "generation_settings": gen.job.params.model_dump(exclude={"stop_token_ids", "logprobs", "n"}),
        "timings": {
            "prompt_n": n_prompt, "prompt_ms": ttft * 1000,
            "prompt_per_token_ms": ttft * 1000 / n_prompt if n_prompt else 0.0,
            "prompt_per_second": n_prompt / ttft if ttft > 0 else 0.0,
            "predicted_n": n_gen, "predicted_ms": decode * 1000,
            "predicted_per_token_ms": decode * 1000 / n_gen if n_gen else 0.0,
            "predicted_per_second": n_gen / decode if decode > 0 else 0.0,
        },
    }


async def _llama_stream(gen: Generation, body: LlamaCompletionRequest, prompt_text: str) -> AsyncIterator[str]:
    try:
        try:
            held: list[int] = []  # tokens whose text the detokenizer still holds back (partial UTF-8)
            async for ev in gen.events():
                held += ev.token_ids
                if ev.text:
                    yield sse.data({"content": ev.text, "stop": False, "id_slot": 0, "tokens": held})
                    held = []
            yield sse.data(llama_final(gen, body, "", prompt_text))
        except APIError as e:
            yield sse.data(e.body())
    finally:
        gen.close()


@router.post("/completion", response_model=None, responses={**SSE_DOC, **ERROR_RESPONSES})
async def llama_completion(body: LlamaCompletionRequest, request: Request, gw: Gateway = Depends(get_gateway),
                           identity: str = Depends(authenticate)) -> Any:
    """llama.cpp server's ``/completion`` (``prompt``, ``n_predict``, ...), streaming with ``stream: true``.
    Without ``stream``, an ``Idempotency-Key`` header makes a retry replay the first answer (docs/api.md)."""
    idem = await Idempotent.open(request, gw, identity, stream=body.stream, resumable=False)
    if idem is not None and (answer := await idem.existing()) is not None:
        return answer
    started = await _start(gw, request, identity, body.model, body.prompt, body.requested_max_tokens,
                           "n_predict", body.sampling, kind="llama", idem=idem)
    if isinstance(started, Response):
        return started
    _tok, gen = started
    prompt_text = body.prompt if isinstance(body.prompt, str) else ""
    if body.stream:
        return sse.EventStreamResponse(_llama_stream(gen, body, prompt_text))
    return await respond_json(idem, request, gen, lambda out: llama_final(gen, body, out.text, prompt_text))

"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway import choices, idempotency, resume
from gateway import openai_format as fmt
from gateway.deps import authenticate, get_gateway
from gateway.errors import bad_request
from gateway.idempotency import Idempotent, respond_json, respond_stream, submitted
from gateway.middleware import arrival_of, request_id_of
from gateway.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from gateway.service import Gateway
from gateway.tokenization import ModelTokenizer, model_not_found
from protocol.errors import APIError
from protocol.messages import IdempotencyMeta, SamplingParams

router = APIRouter(tags=["OpenAI"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "Invalid request: wrong types or values, malformed JSON, prompt longer than the context"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full or too many concurrent requests (see Retry-After)"),
        (503, "No live worker serves the model, or Redis is unavailable (see Retry-After)"),
        (504, "The request timed out"),
    )
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or with stream=true a text/event-stream of chunks ending in data: [DONE]",
          "content": {"text/event-stream": {}}},
}


async def _serve(request: Request, gw: Gateway, identity: str, idem: Idempotent | None, tok: ModelTokenizer,
                 prompt_ids: list[int], params: SamplingParams, *, chat: bool, stream: bool,
                 include_usage: bool, n: int = 1) -> Response:
    """Submit the job (holding the Idempotency-Key first, if there is one) and answer it; ``n`` > 1:
    one job per choice (gateway/choices.py)."""
    rid, created = fmt.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    render = fmt.chat_completion if chat else fmt.text_completion
    if n > 1:
        if idem is not None:
            raise bad_request("Idempotency-Key is not supported with n > 1", param="n", code="unsupported_with_n")
        gens = await choices.submit_choices(gw, n, tok=tok, prompt_ids=prompt_ids, params=params, request_id=rid,
                                            identity=identity, arrival=arrival_of(request.scope),
                                            client_request_id=request_id_of(request.scope))
        if stream:
            return choices.respond_stream(gens, fmt.ChunkMaker(rid, tok.name, created, chat, include_usage),
                                          len(prompt_ids))
        return await choices.respond_json(request, gens, lambda out: render(rid, tok.name, created, out))
    if idem is not None:
        meta = IdempotencyMeta(kind="chat" if chat else "text", stream=stream, model=tok.name, created=created,
                               include_usage=include_usage, prompt_tokens=len(prompt_ids),
                               gateway_id=gw.settings.gateway_id)
        answer = await idem.claim(rid, meta, time.time() + gw.settings.request_timeout)
        if answer is not None:
            return answer
    gen = await submitted(idem, gw.submit(tok=tok, prompt_ids=prompt_ids, params=params, request_id=rid,
                                          identity=identity, arrival=arrival_of(request.scope),
                                          client_request_id=request_id_of(request.scope)))
    if stream:
        chunks = fmt.ChunkMaker(rid, tok.name, created, chat, include_usage)
        return respond_stream(idem, gen, resume.openai_stream(gen.events(), chunks, gen.prompt_tokens))
    return await respond_json(idem, request, gen, lambda out: render(rid, tok.name, created, out))


@router.post("/v1/chat/completions", response_model=None, responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
async def chat_completions(body: ChatCompletionRequest, request: Request, gw: Gateway = Depends(get_gateway),
                           identity: str = Depends(authenticate)) -> Any:
    """Chat completion (OpenAI API), streaming with ``stream: true``. ``Idempotency-Key`` and
    ``Last-Event-ID`` headers: see docs/api.md."""
    idem = await Idempotent.open(request, gw, identity, stream=body.stream)
    if idem is not None and (answer := await idem.existing()) is not None:
        return answer
    tok = await gw.model_for(body.model)
    prompt_ids = await gw.encode_chat(tok, [m.for_template() for m in body.messages])
    max_tokens = gw.plan_max_tokens(tok, len(prompt_ids), body.requested_max_tokens,
                                    "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    params = body.sampling(max_tokens, logprobs=body.num_logprobs)
    return await _serve(request, gw, identity, idem, tok, prompt_ids, params, chat=True, stream=body.stream,
                        include_usage=body.include_usage, n=body.n)


@router.post("/v1/completions", response_model=None, responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
async def completions(body: CompletionRequest, request: Request, gw: Gateway = Depends(get_gateway),
                      identity: str = Depends(authenticate)) -> Any:
    """Text completion (OpenAI legacy API), streaming with ``stream: true``. ``Idempotency-Key`` and
    ``Last-Event-ID`` headers: see docs/api.md."""
    idem = await Idempotent.open(request, gw, identity, stream=body.stream)
    if idem is not None and (answer := await idem.existing()) is not None:
        return answer
    tok = await gw.model_for(body.model)
    prompt_ids = await gw.encode_prompt(tok, body.prompt_value())
    max_tokens = gw.plan_max_tokens(tok, len(prompt_ids), body.max_tokens, "max_tokens")
    params = body.sampling(max_tokens, logprobs=body.logprobs)
    return await _serve(request, gw, identity, idem, tok, prompt_ids, params, chat=False, stream=body.stream,
                        include_usage=body.include_usage, n=body.n)


@router.get("/v1/streams/{stream_id}", response_model=None,
            responses={200: {"description": "text/event-stream: the stream's events after Last-Event-ID",
                             "content": {"text/event-stream": {}}},
                       400: ERROR_RESPONSES[400], 401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503],
                       404: {"model": ErrorResponse, "description": "No resumable stream with this id"}})
async def resume_stream(stream_id: str, request: Request, gw: Gateway = Depends(get_gateway),
                        identity: str = Depends(authenticate)) -> Any:
    """A stream started with an ``Idempotency-Key``, by its id, from the start or past the event named
    by the ``Last-Event-ID`` header (or ``?last_event_id=``): the rest of it, finished or still running."""
    return await idempotency.resume_stream(request, gw, identity, stream_id)


def _model_card(name: str, manifest: Any | None, served: bool) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "owned_by": "spindle", "served": served,
                            "in_store": manifest is not None}
    if manifest is not None:
        card.update(created=int(manifest.created), context_length=manifest.context_length,
                    architecture=manifest.architecture, parameter_count=manifest.parameter_count,
                    source=manifest.source, parent=manifest.parent)
    else:
        card["created"] = 0
    return card


@router.get("/v1/models", responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
async def list_models(gw: Gateway = Depends(get_gateway), identity: str = Depends(authenticate)) -> dict[str, Any]:
    """Models in the artifact store plus those a live worker serves; ``served`` says which can answer now."""
    manifests = {m.name: m for m in await gw.tokenizers.run(gw.tokenizers.store.list)}
    served = await gw.workers.served_models()
    names = sorted(set(manifests) | served)
    return {"object": "list", "data": [_model_card(n, manifests.get(n), n in served) for n in names]}


@router.get("/v1/models/{model_id}", responses={s: ERROR_RESPONSES[s] for s in (401, 404, 503)})
async def get_model(model_id: str, gw: Gateway = Depends(get_gateway),
                    identity: str = Depends(authenticate)) -> dict[str, Any]:
    """One model's card; 404 if it is neither in the store nor served."""
    served = await gw.workers.served_models()
    try:
        _path, manifest = await gw.tokenizers.lookup(model_id)
    except APIError:
        if model_id not in served:
            raise
        manifest = None
    if manifest is None and model_id not in served:
        raise model_not_found(model_id)
    return _model_card(model_id, manifest, model_id in served)

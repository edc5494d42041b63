"""OpenAI's ``n`` > 1: several choices for one prompt, each a job of its own.

Why jobs and not one job that forks inside the engine: the job is the unit everything else is
built on (admission and rate limits, deadlines, cancellation, takeover after a worker dies with
resume from the delivered tokens, dead-lettering, the event log), so choices as jobs inherit all of
it unchanged, and a large ``n`` may spread over several workers. The prompt is still computed once
per worker: the jobs are queued back to back, a worker pulls them in one read, and its engine
admits a sequence whose prompt blocks another sequence is computing only once those blocks are
cached (``BlockManager.prefix_in_flight``), so the siblings share the prompt's KV blocks.

Admission is all or nothing: if choice ``k`` is refused (queue full, rate limit), the ``k - 1``
already queued are cancelled and the client gets that refusal. With a ``seed``, choice ``i``
samples with ``seed + i`` (the same request gives the same choices; they differ from each other).
Streams of ``n`` > 1 interleave the choices' chunks as they come, each with its ``index``; they
carry no SSE ids, since only streams with an ``Idempotency-Key`` are resumable and keys are refused
with ``n`` > 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from gateway import openai_format as fmt
from gateway import sse
from gateway.generation import Generation, Outcome, unless_disconnected
from protocol.errors import APIError
from protocol.messages import SamplingParams, TokenEvent

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.service import Gateway
    from gateway.tokenization import ModelTokenizer

log = logging.getLogger("gateway.choices")
SEED_MODULUS = 2**64  # seeds wrap like the engine's generators (protocol seeds are int64 and above)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None or index == 0:
        return params
    return params.model_copy(update={"seed": (params.seed + index) % SEED_MODULUS})


async def submit_choices(gw: Gateway, n: int, *, tok: ModelTokenizer, prompt_ids: list[int], params: SamplingParams,
                         request_id: str, identity: str, arrival: float, client_request_id: str = ""
                         ) -> list[Generation]:
    """Queue ``n`` jobs (``<request_id>-<i>``) for one prompt; all of them or none."""
    gens: list[Generation] = []
    try:
        for i in range(n):
            gens.append(await gw.submit(tok=tok, prompt_ids=prompt_ids, params=choice_params(params, i),
                                        request_id=f"{request_id}-{i}", identity=identity, arrival=arrival,
                                        client_request_id=client_request_id))
    except BaseException:
        for gen in gens:
            gen.close()  # cancels the jobs already queued
        raise
    return gens


async def _collect_all(gens: list[Generation]) -> list[Outcome]:
    """Every choice's outcome; the first failure cancels the others and is raised as it is."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(g.collect()) for g in gens]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


async def respond_json(request: Request, gens: list[Generation], build: Callable[[Outcome], dict[str, Any]]
                       ) -> JSONResponse:
    """One response with every choice; a client that goes away cancels all of them."""
    try:
        outs = await unless_disconnected(request, _collect_all(gens))
    finally:
        for gen in gens:
            gen.close()
    return JSONResponse(fmt.merge_choices([build(out) for out in outs]))


async def _pump(index: int, gen: Generation, queue: asyncio.Queue[tuple[int, TokenEvent | APIError | None]]) -> None:
    try:
        async for ev in gen.events():
            await queue.put((index, ev))
    except APIError as e:
        await queue.put((index, e))
        return
    except Exception as e:  # never leave the stream waiting for a choice that died
        log.exception("choice %d of %s failed", index, gen.request_id)
        await queue.put((index, APIError(500, f"Internal error: {type(e).__name__}", "server_error", None,
                                         "internal_error")))
        return
    await queue.put((index, None))


async def stream(gens: list[Generation], chunks: fmt.ChunkMaker, prompt_tokens: int) -> AsyncIterator[str]:
    """SSE text of an ``n``-choice stream: role chunks (chat), the choices' chunks as they arrive,
    the usage chunk if asked for, ``[DONE]``. A failed choice ends the stream with its error."""
    # Bounded: a slow client backs up into the subscriptions, which have bounds of their own.
    queue: asyncio.Queue[tuple[int, TokenEvent | APIError | None]] = asyncio.Queue(maxsize=8 * len(gens))
    tasks = [asyncio.create_task(_pump(i, g, queue)) for i, g in enumerate(gens)]
    try:
        if chunks.chat:
            for i in range(len(gens)):
                yield sse.data(chunks.role(i))
        left = len(gens)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, APIError):
                yield sse.data(item.body())
                break
            elif item.finish_reason is not None or item.text or item.logprobs:
                yield sse.data(chunks.content(item.text, item.logprobs, item.finish_reason, index))
        else:
            if chunks.include_usage:
                yield sse.data(chunks.usage(prompt_tokens, sum(g.completion_tokens for g in gens)))
        yield sse.DONE
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        for gen in gens:
            gen.close()


def respond_stream(gens: list[Generation], chunks: fmt.ChunkMaker, prompt_tokens: int) -> sse.EventStreamResponse:
    return sse.EventStreamResponse(stream(gens, chunks, prompt_tokens))

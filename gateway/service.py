"""The gateway's shared state and the steps every generation endpoint takes, in order:

1. ``model_for``: the model exists in the artifact store (else 404) and a live worker serves it
   (else 503 with ``Retry-After``); its tokenizer is loaded.
2. ``encode_chat`` / ``encode_prompt``: the prompt's token ids (on the tokenizer threads).
3. ``plan_max_tokens``: prompt + max_tokens must fit the context (else 400 naming both numbers).
4. ``submit``: admission (``gateway/admission.py``: a concurrency slot, the caller's rate limits, else
   429), a subscription for the request id, then the job is queued if its model's queue has room
   (else 429). Only now does anything reach the queue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.admission import Admission
from gateway.canceller import Canceller
from gateway.dispatcher import Dispatcher
from gateway.errors import bad_request
from gateway.generation import Generation
from gateway.metrics import GatewayMetrics
from gateway.tokenization import ModelTokenizer, TokenizerCache
from gateway.workers import WorkerRegistry
from protocol import tracing
from protocol.errors import APIError, unavailable
from protocol.messages import Job, SamplingParams
from protocol.settings import GatewaySettings


@dataclass
class Gateway:
    settings: GatewaySettings
    redis: aioredis.Redis
    dispatcher: Dispatcher
    canceller: Canceller
    tokenizers: TokenizerCache
    workers: WorkerRegistry
    admission: Admission
    metrics: GatewayMetrics
    warm_up: asyncio.Task | None = None  # the default model's tokenizer being preloaded

    @property
    def draining(self) -> bool:
        """Shutting down: ``/ready`` and new requests answer 503 (admission decides)."""
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    @property
    def warmed_up(self) -> bool:
        return self.warm_up is None or self.warm_up.done()

    async def model_for(self, name: str | None) -> ModelTokenizer:
        name = name or self.settings.default_model
        await self.tokenizers.lookup(name)
        if not await self.workers.serving(name):
            raise unavailable(f"No live worker serves model '{name}' right now; retry shortly",
                              retry_after=5, code="model_not_served")
        return await self.tokenizers.get(name)

    async def encode_chat(self, tok: ModelTokenizer, messages: list[dict[str, str]]) -> list[int]:
        ids = await self.tokenizers.run(tok.encode_chat, messages)
        if not ids:
            raise bad_request("The messages produced an empty prompt", param="messages")
        return ids

    async def encode_prompt(self, tok: ModelTokenizer, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
            if bad:
                raise bad_request(f"Token id {bad[0]} is outside the vocabulary of '{tok.name}' "
                                  f"(0..{tok.vocab_size - 1})", param=param)
            ids = list(prompt)
        else:
            ids = await self.tokenizers.run(tok.encode_prompt, prompt)
        if not ids:
            raise bad_request("The prompt is empty", param=param)
        return ids

    def plan_max_tokens(self, tok: ModelTokenizer, n_prompt: int, requested: int | None,
                        param: str = "max_tokens") -> int:
        ctx = tok.context_length
        if requested is None:
            if n_prompt >= ctx:
                raise bad_request(f"This model's maximum context length is {ctx} tokens, but the prompt "
                                  f"has {n_prompt} tokens. Please shorten the prompt.",
                                  param="messages" if param == "max_tokens" else "prompt",
                                  code="context_length_exceeded")
            return min(self.settings.default_max_tokens, ctx - n_prompt)
        if n_prompt + requested > ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                              f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for "
                              f"the completion). Please reduce the prompt or {param}.",
                              param=param, code="context_length_exceeded")
        return requested

    async def submit(self, *, tok: ModelTokenizer, prompt_ids: list[int], params: SamplingParams,
                     request_id: str, identity: str, arrival: float, client_request_id: str = "") -> Generation:
        ticket = await self.admission.admit(identity, len(prompt_ids) + params.max_tokens)
        try:
            sub = self.dispatcher.register(request_id)
        except APIError:
            ticket.cancel()
            raise
        job = Job(request_id=request_id, gateway_id=self.settings.gateway_id, model=tok.name,
                  prompt_token_ids=prompt_ids, params=params, trace=tracing.inject(),
                  deadline=time.time() + max(0.0, self.settings.request_timeout - (time.monotonic() - arrival)))
        try:
            await self.admission.enqueue(job)
        except APIError:
            self.dispatcher.unregister(request_id)
            ticket.cancel()
            raise
        except BaseException:
            # The XADD may have happened before the error: make sure a worker drops the job.
            self.canceller.cancel(request_id)
            self.dispatcher.unregister(request_id)
            ticket.release()
            raise
        # At the end, the tokens reserved and not generated go back to the caller's rate limit.
        gen = Generation(self, job, sub, lambda: ticket.release(params.max_tokens - gen.completion_tokens),
                         arrival, client_request_id)
        return gen

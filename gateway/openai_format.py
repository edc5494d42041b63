"""OpenAI wire objects: chat.completion(.chunk), text_completion, logprobs, usage."""

from __future__ import annotations

import uuid
from typing import Any

from gateway.generation import Outcome
from protocol.messages import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8")),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
                          for _id, s, lp in t.top]}
        for t in items]}


def completion_logprobs(items: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    if items is None:
        return None
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{s: lp for _id, s, lp in t.top} for t in items], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, created: int, out: Outcome) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "logprobs": chat_logprobs(out.logprobs), "finish_reason": out.finish_reason,
                     "stop_reason": out.stop_reason}],
        "usage": usage(out.prompt_tokens, out.completion_tokens),
    }


def text_completion(rid: str, model: str, created: int, out: Outcome) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "text": out.text, "logprobs": completion_logprobs(out.logprobs),
                     "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}],
        "usage": usage(out.prompt_tokens, out.completion_tokens),
    }


class ChunkMaker:
    """Builds the stream's chunks; every one has the same id, created and model."""

    def __init__(self, rid: str, model: str, created: int, chat: bool, include_usage: bool):
        self.base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": created, "model": model, "system_fingerprint": None}
        self.chat = chat
        self.include_usage = include_usage
        self.text_offset: dict[int, int] = {}  # per choice

    def _wrap(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**self.base, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def role(self, index: int = 0) -> dict[str, Any]:
        return self._wrap([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}])

    def content(self, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str | None = None,
                index: int = 0) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs),
                      "finish_reason": finish_reason}
        else:
            offset = self.text_offset.get(index, 0)
            choice = {"index": index, "text": text, "logprobs": completion_logprobs(logprobs, offset),
                      "finish_reason": finish_reason}
            self.text_offset[index] = offset + len(text)
        return self._wrap([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def merge_choices(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One response with ``n`` choices from ``n`` one-choice responses to the same prompt: choice
    ``i`` comes from body ``i``; the prompt is counted once in the usage, the completions summed."""
    first = bodies[0]
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    return {**first, "choices": [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)],
            "usage": usage(first["usage"]["prompt_tokens"], completion)}

"""Shared helpers for the engine tests (not a test module itself: it has no tests)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from protocol.messages import SamplingParams
from worker.engine.api import EngineOutput, EngineRequest


@dataclass
class Collected:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    outputs: list[EngineOutput] = field(default_factory=list)


def run_to_completion(engine: Any, requests: list[EngineRequest] | None = None,
                      max_steps: int = 10_000) -> dict[str, Collected]:
    """Add ``requests``, step until idle, collect each request's tokens/text/finish reason."""
    for r in requests or []:
        engine.add_request(r)
    got: dict[str, Collected] = defaultdict(Collected)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        collect(got, engine.step())
    else:
        raise AssertionError("engine did not finish")
    return dict(got)


def collect(got: dict[str, Collected], outputs: list[EngineOutput]) -> None:
    for out in outputs:
        c = got[out.request_id]
        assert c.finish_reason is None, f"output after finish for {out.request_id}"
        c.tokens += out.new_token_ids
        c.text += out.new_text
        c.finish_reason = out.finish_reason
        c.outputs.append(out)


def greedy(max_tokens: int = 24, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate`` alone, greedy: the generated ids (EOS included if it stopped there)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    gen = out[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    if eos in gen:  # generate pads after EOS; the engine stops there
        gen = gen[: gen.index(eos) + 1]
    return gen


def prompts_for(tokenizer: Any, n: int, seed: int = 0, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.randint(5, vocab, (length,), generator=g).tolist())
    return out


def greedy_margins(model: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """How far below the best token each of ``tokens`` is, in logits of ``model`` (float32), when the
    sequence ``prompt + tokens`` is fed to it at once (teacher forcing). 0 means it was the argmax.

    Exact token equality is the check in float32. In bf16 two correct implementations round
    differently (another summation order in attention, packed batches) and part ways at the first
    near-tie, so there the check is that every token an engine picked greedily was a (near-)argmax
    of a float32 reference given the same history: a wrong cache or mask gives margins of whole logits.
    """
    ids = torch.tensor([prompt + tokens], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    picked = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return (rows.max(dim=1).values - picked).tolist()

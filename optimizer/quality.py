"""The quality gate: a candidate artifact must predict held-out text about as well as its source.

Both models read the same held-out tokens (teacher forcing, chunks of at most ``chunk_len``). The
gate compares the candidate's perplexity with the source's (``perplexity_ratio`` = candidate /
source, at most ``max_perplexity_ratio``) and how often the two models' most likely next token
agree (``top1_agreement``, at least ``min_top1_agreement``; this is greedy decoding's choice at
every position, so it bounds how often greedy output can diverge).

The held-out text is the model directory's ``heldout.txt`` when it has one (the bundled
tiny-shakespeare ships one) and otherwise a public-domain paragraph below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

# Lincoln's Gettysburg Address (1863) and the opening of Dickens' A Tale of Two Cities (1859).
BUILTIN_HELDOUT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
    "in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a "
    "great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long "
    "endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that "
    "field, as a final resting place for those who here gave their lives that that nation might live. It "
    "is altogether fitting and proper that we should do this.\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way."
)


@dataclass(frozen=True)
class Gate:
    max_perplexity_ratio: float
    min_top1_agreement: float


# Stated tolerances per pass. bf16 keeps 8 bits of mantissa, fp16 10, int8 per-channel ~7 bits of
# the largest weight in a row; the bounds leave room for that and fail anything that is broken.
DEFAULT_GATES: dict[str, Gate] = {
    "safetensors": Gate(1.001, 0.999),
    "fp16": Gate(1.01, 0.97),
    "bf16": Gate(1.03, 0.93),
    "int8": Gate(1.05, 0.90),
}


@dataclass
class Scores:
    nll_sum: float
    tokens: int
    top1: list[torch.Tensor]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))


def heldout_text(model_dir: Path) -> tuple[str, str]:
    """(text, where it came from)."""
    p = Path(model_dir) / "heldout.txt"
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text, "heldout.txt"
    return BUILTIN_HELDOUT, "builtin"


def token_chunks(tokenizer: Any, text: str, max_tokens: int, chunk_len: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 8:
        raise ValueError("held-out text is too short to judge a model (fewer than 8 tokens)")
    chunk_len = max(8, chunk_len)
    return [torch.tensor([ids[i:i + chunk_len]]) for i in range(0, len(ids) - 1, chunk_len)
            if len(ids[i:i + chunk_len]) >= 2]


@torch.inference_mode()
def score(model: Any, chunks: list[torch.Tensor]) -> Scores:
    device = next(model.parameters()).device
    nll, n, top1 = 0.0, 0, []
    for chunk in chunks:
        ids = chunk.to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        n += targets.numel()
        top1.append(logits.argmax(-1).cpu())
    return Scores(nll, n, top1)


def compare(source: Scores, candidate: Scores, gate: Gate) -> tuple[dict[str, float], str | None]:
    """(numbers for the manifest, why the gate failed or None)."""
    agree = sum(int((a == b).sum()) for a, b in zip(source.top1, candidate.top1, strict=True))
    total = sum(a.numel() for a in source.top1)
    ratio = candidate.perplexity / source.perplexity
    quality = {
        "perplexity": round(candidate.perplexity, 4),
        "source_perplexity": round(source.perplexity, 4),
        "perplexity_ratio": round(ratio, 5),
        "top1_agreement": round(agree / max(total, 1), 5),
        "eval_tokens": float(total),
        "max_perplexity_ratio": gate.max_perplexity_ratio,
        "min_top1_agreement": gate.min_top1_agreement,
    }
    problems = []
    if not math.isfinite(ratio) or ratio > gate.max_perplexity_ratio:
        problems.append(f"perplexity {candidate.perplexity:.4g} vs source {source.perplexity:.4g} "
                        f"(ratio {ratio:.4f} > {gate.max_perplexity_ratio})")
    if quality["top1_agreement"] < gate.min_top1_agreement:
        problems.append(f"top-1 agreement {quality['top1_agreement']:.4f} < {gate.min_top1_agreement}")
    return quality, "; ".join(problems) or None

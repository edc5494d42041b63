"""Next-token sampling, vectorized over the batch with per-request parameters.

Order (as vLLM/HF): penalties -> greedy argmax, or temperature -> top_k -> top_p -> min_p -> sample.
Sampling uses the exponential-race trick (``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly
from ``p``; a seeded request draws its ``q`` from its own ``torch.Generator``, so its tokens do not
depend on what else is in the batch. Logprobs are those of the raw model distribution (before
penalties and temperature), as the OpenAI API reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protocol.messages import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's own generator when it has a seed; None means the sampler's shared one."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def advance_generator(gen: torch.Generator, vocab_size: int, steps: int, device: torch.device | str) -> None:
    """Consume the random numbers ``steps`` samples would have used (resuming a seeded request)."""
    scratch = torch.empty(vocab_size, device=device)
    for _ in range(steps):
        scratch.exponential_(generator=gen)


@dataclass
class SampleRow:
    """What the sampler needs about one sequence. The id lists are read, never modified."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None  # of the chosen token, when logprobs were asked for
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} requests")
        if not rows:
            return []
        raw = logits.float()
        logits = self._apply_penalties(raw, rows)
        tokens = torch.argmax(logits, dim=-1)
        sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sample_idx:
            tokens[sample_idx] = self._sample(logits[sample_idx], [rows[i] for i in sample_idx])
        token_list = tokens.tolist()
        out = [Sampled(t) for t in token_list]
        self._add_logprobs(raw, rows, tokens, out)
        return out

    # -- penalties -----------------------------------------------------------------------------

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        idx = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
        if not idx:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in idx:
            p = rows[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(rows[i].prompt_ids + rows[i].output_ids, dtype=torch.long,
                                    device=logits.device)
                seen = seen[(seen >= 0) & (seen < vocab)]
                if seen.numel():
                    vals = row[seen]
                    row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and rows[i].output_ids:
                out = torch.tensor(rows[i].output_ids, dtype=torch.long, device=logits.device)
                out = out[(out >= 0) & (out < vocab)]
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    # -- sampling ------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=logits.dtype)
        logits = logits / temps.unsqueeze(1)
        vocab = logits.shape[1]
        neg_inf = torch.finfo(logits.dtype).min

        ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        if min(ks) < vocab:
            k_t = torch.tensor(ks, device=dev)
            top_vals = torch.topk(logits, max(ks), dim=-1).values
            kth = top_vals.gather(1, (k_t - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, neg_inf)

        tps = [r.params.top_p for r in rows]
        if min(tps) < 1.0:
            p_idx = [i for i, tp in enumerate(tps) if tp < 1.0]
            sub = logits[p_idx]
            sorted_logits, order = torch.sort(sub, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
            top_p = torch.tensor([tps[i] for i in p_idx], device=dev, dtype=probs.dtype).unsqueeze(1)
            drop_sorted = before >= top_p  # the first token always stays (before == 0)
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits[p_idx] = sub.masked_fill(drop, neg_inf)

        probs = torch.softmax(logits, dim=-1)
        mps = [r.params.min_p for r in rows]
        if max(mps) > 0.0:
            min_p = torch.tensor(mps, device=dev, dtype=probs.dtype).unsqueeze(1)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p
            probs = probs.masked_fill(probs < threshold, 0.0)

        q = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if len(shared) == len(rows):
            q.exponential_(generator=self.generator)
        else:
            for i, r in enumerate(rows):
                if r.generator is not None:
                    q[i].exponential_(generator=r.generator)
            if shared:
                q[shared] = torch.empty((len(shared), vocab), device=dev).exponential_(
                    generator=self.generator)
        return torch.argmax(probs / q, dim=-1)

    # -- logprobs ------------------------------------------------------------------------------

    @staticmethod
    def _add_logprobs(raw: torch.Tensor, rows: list[SampleRow], tokens: torch.Tensor,
                      out: list[Sampled]) -> None:
        idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not idx:
            return
        lp = torch.log_softmax(raw[idx], dim=-1)
        chosen = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
        n_top = max(rows[i].params.logprobs or 0 for i in idx)
        if n_top > 0:
            top_v, top_i = torch.topk(lp, min(n_top, lp.shape[1]), dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(idx):
            out[i].logprob = chosen[j]
            n = rows[i].params.logprobs or 0
            out[i].top = list(zip(top_i[j][:n], top_v[j][:n], strict=True)) if n > 0 else []


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

"""A request inside an engine (``Sequence``) and the rules that turn sampled tokens into outputs.

State machine: WAITING -> RUNNING -> FINISHED(stop | length | cancelled | error); a preempted
sequence goes back RUNNING -> WAITING and recomputes its KV when it is scheduled again.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from protocol.messages import FinishReason, TokenLogprob
from worker.engine.api import EngineOutput, EngineRequest
from worker.engine.detokenizer import IncrementalDetokenizer, TokenTextCache
from worker.engine.sampler import Sampled, SampleRow, advance_generator, make_generator


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens, sampling state, detokenizer and (for the paged engine) KV blocks."""

    def __init__(self, request: EngineRequest, tokenizer: Any, vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.request_id = request.request_id
        self.params = request.params
        self.arrival_time = request.arrival_time
        self.prompt_ids: list[int] = list(request.prompt_token_ids)
        # Tokens already delivered by an earlier attempt count as generated.
        self.output_ids: list[int] = list(request.resume_token_ids)
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.first_token_time: float | None = None
        if request.resume_text_len is None:
            self.detok = IncrementalDetokenizer(tokenizer, prompt_ids=self.prompt_ids + self.output_ids,
                                                stop=self.params.stop)
        else:
            self.detok = IncrementalDetokenizer.resumed(tokenizer, self.prompt_ids, self.output_ids,
                                                        request.resume_text_len, self.params.stop)
        self.generator = make_generator(self.params.seed, device)
        if self.generator is not None and self.output_ids:
            advance_generator(self.generator, vocab_size, len(self.output_ids), device)
        self.sample_row = SampleRow(self.params, self.generator, self.prompt_ids, self.output_ids)
        # Paged engine bookkeeping.
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the leading full, computed blocks
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache at admission
        self.num_preemptions = 0
        self.prompt_block_hashes: list[int] | None = None  # chain hashes of the prompt's blocks (lazily)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Prompt and generated tokens as one list, sliced."""
        n_prompt = len(self.prompt_ids)
        end = self.num_tokens if end is None else end
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt:end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - n_prompt]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def model_max_len(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def output_vocab_size(model: Any) -> int:
    """Rows of the LM head (the logits' width), also once its weight has been packed."""
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None)
    return int(rows) if rows is not None else int(head.weight.shape[0])


class OutputProcessor:
    """Applies stops (EOS, stop ids, stop strings, max_tokens, context end) and builds outputs."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], max_model_len: int,
                 vocab_size: int | None = None) -> None:
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.token_text = TokenTextCache(tokenizer)

    def check_admissible(self, seq: Sequence) -> str | None:
        """Why a new request cannot run at all (an error message), or None."""
        if not seq.prompt_ids:
            return "empty prompt"
        if seq.num_tokens >= self.max_model_len:
            return (f"prompt of {seq.num_tokens} tokens does not fit the context length "
                    f"{self.max_model_len}")
        if self.vocab_size is not None:
            ids = seq.prompt_ids + seq.output_ids
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                return f"token id out of range [0, {self.vocab_size})"
        return None

    def already_done(self, seq: Sequence) -> bool:
        """True when a (resumed) request has nothing left to generate."""
        return len(seq.output_ids) >= seq.params.max_tokens

    def append(self, seq: Sequence, sampled: Sampled, now: float | None = None) -> EngineOutput:
        """Add one sampled token to ``seq``; return its output (finishing it when a stop hits)."""
        token = sampled.token_id
        seq.output_ids.append(token)
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = time.monotonic() if now is None else now
        reason: FinishReason | None = None
        text = ""
        if (token in self.eos_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            reason = "stop"
        else:
            text = seq.detok.add([token])
            if seq.detok.stopped:
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= seq.params.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += seq.detok.flush()
            seq.status = RequestStatus.FINISHED
            seq.finish_reason = reason
        out = EngineOutput(
            request_id=seq.request_id, new_token_ids=[token], new_text=text, finish_reason=reason,
            stop_reason=seq.detok.stop_string if seq.detok.stopped else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_generated_tokens=len(seq.output_ids),
            first_token_time=seq.first_token_time if first else None,
        )
        if sampled.logprob is not None:
            out.logprobs = [TokenLogprob(
                token_id=token, token=self.token_text(token), logprob=sampled.logprob,
                top=[(t, self.token_text(t), lp) for t, lp in (sampled.top or [])])]
        return out

    @staticmethod
    def finish(seq: Sequence, reason: FinishReason, error: str | None = None) -> EngineOutput:
        """End ``seq`` without a new token (cancelled, error, or nothing left to generate)."""
        text = seq.detok.flush() if reason in ("length", "stop") else ""
        seq.status = RequestStatus.FINISHED
        seq.finish_reason = reason
        return EngineOutput(request_id=seq.request_id, new_token_ids=[], new_text=text, finish_reason=reason,
                            num_prompt_tokens=seq.num_prompt_tokens, num_generated_tokens=len(seq.output_ids),
                            error=error)

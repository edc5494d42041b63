"""The reference engine: each request runs with its own transformers ``DynamicCache``.

Correct and short, not fast: one forward per running request per step (prefill on the first step,
then one token). It is the fallback (``ENGINE=simple``) and the yardstick the paged engine is
tested against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from worker.engine.api import EngineOutput, EngineRequest, EngineStats
from worker.engine.request import (
    OutputProcessor,
    RequestStatus,
    Sequence,
    eos_token_ids,
    model_max_len,
    output_vocab_size,
)
from worker.engine.sampler import Sampler

log = logging.getLogger(__name__)


class SimpleEngine:
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 32, max_model_len: int | None = None,
                 seed: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_model_len = max_model_len or model_max_len(model.config)
        self.vocab_size = output_vocab_size(model)
        self.sampler = Sampler(self.device, seed)
        self.outputs = OutputProcessor(tokenizer, eos_token_ids(model, tokenizer), self.max_model_len,
                                       self.vocab_size)
        self._lock = threading.Lock()
        self._incoming: deque[EngineRequest] = deque()
        self._cancels: set[str] = set()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._caches: dict[str, Any] = {}
        self._stats = EngineStats()

    # -- thread-safe intake ------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        with self._lock:
            self._incoming.append(request)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._incoming or self._cancels)
        return pending or bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        self._stats.running = len(self.running)
        self._stats.waiting = len(self.waiting) + len(self._incoming)
        return self._stats

    # -- the step ----------------------------------------------------------------------------------

    def _intake(self, outputs: list[EngineOutput]) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, deque()
            cancels, self._cancels = self._cancels, set()
        for req in incoming:
            seq = Sequence(req, self.tokenizer, self.vocab_size, self.device)
            error = self.outputs.check_admissible(seq)
            if error:
                outputs.append(OutputProcessor.finish(seq, "error", error))
            elif self.outputs.already_done(seq):
                outputs.append(OutputProcessor.finish(seq, "length"))
            else:
                self.waiting.append(seq)
        if cancels:
            for seq in [s for s in self.waiting if s.request_id in cancels]:
                self.waiting.remove(seq)
                outputs.append(OutputProcessor.finish(seq, "cancelled"))
            for rid in cancels & self.running.keys():
                outputs.append(OutputProcessor.finish(self.running.pop(rid), "cancelled"))
                self._caches.pop(rid, None)

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs: list[EngineOutput] = []
        self._intake(outputs)
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running[seq.request_id] = seq
        seqs, rows = [], []
        for seq in list(self.running.values()):
            try:
                rows.append(self._forward(seq))
                seqs.append(seq)
            except Exception as exc:  # one bad request must not take the others down
                log.exception("forward failed for %s", seq.request_id)
                outputs.append(OutputProcessor.finish(seq, "error", f"engine error: {exc}"))
                self._drop(seq)
        if seqs:
            sampled = self.sampler(torch.cat(rows), [s.sample_row for s in seqs])
            now = time.monotonic()
            for seq, smp in zip(seqs, sampled, strict=True):
                outputs.append(self.outputs.append(seq, smp, now))
                if seq.is_finished:
                    self._drop(seq)
        self._stats.steps += 1
        self._stats.last_batch_size = len(seqs)
        self._stats.last_step_seconds = time.perf_counter() - start
        return outputs

    def _forward(self, seq: Sequence) -> torch.Tensor:
        from transformers import DynamicCache

        cache = self._caches.get(seq.request_id)
        if cache is None:
            cache = self._caches[seq.request_id] = DynamicCache(config=self.model.config)
            ids = seq.token_ids()
        else:
            ids = [seq.last_token]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _drop(self, seq: Sequence) -> None:
        self.running.pop(seq.request_id, None)
        self._caches.pop(seq.request_id, None)

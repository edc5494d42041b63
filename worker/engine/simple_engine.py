"""The reference engine: each request runs with its own transformers ``DynamicCache``.

Correct and short, not fast: one forward per running request per step (prefill on the first step,
then one token). It is the fallback (``ENGINE=simple``) and the yardstick the paged engine is
tested against.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from worker.engine.api import EngineOutput
from worker.engine.base import SlotEngine
from worker.engine.request import OutputProcessor, Sequence, eos_token_ids, model_max_len, output_vocab_size
from worker.engine.sampler import Sampler

log = logging.getLogger(__name__)


class SimpleEngine(SlotEngine):
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 32, max_model_len: int | None = None,
                 seed: int | None = None) -> None:
        self.model = model.eval()
        self.max_model_len = max_model_len or model_max_len(model.config)
        vocab_size = output_vocab_size(model)
        outputs = OutputProcessor(tokenizer, eos_token_ids(model, tokenizer), self.max_model_len, vocab_size)
        super().__init__(tokenizer, outputs, vocab_size, next(model.parameters()).device, max_batch)
        self.sampler = Sampler(self.device, seed)
        self._caches: dict[str, Any] = {}

    def _release(self, seq: Sequence) -> None:
        self._caches.pop(seq.request_id, None)

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs: list[EngineOutput] = []
        self._intake(outputs)
        self._fill_slots()
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
        self._record_step(start, len(seqs))
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

"""A model-free engine for testing the serving fabric: it "generates" the prompt's tokens cyclically.

One token per running request per step, after a small sleep standing in for the forward pass.
Stops (stop ids, stop strings, max_tokens), cancellation and resume behave as in the real engines;
EOS does not stop it (a prompt may well contain the EOS token).
"""

from __future__ import annotations

import time
from typing import Any

from worker.engine.api import EngineOutput
from worker.engine.base import SlotEngine
from worker.engine.request import OutputProcessor
from worker.engine.sampler import Sampled


class EchoEngine(SlotEngine):
    def __init__(self, tokenizer: Any, step_delay: float = 0.002, max_batch: int = 32,
                 max_model_len: int = 32768) -> None:
        super().__init__(tokenizer, OutputProcessor(tokenizer, set(), max_model_len), len(tokenizer),
                         max_batch=max_batch)
        self.step_delay = step_delay
        self.max_model_len = max_model_len

    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs: list[EngineOutput] = []
        self._intake(outputs)
        self._fill_slots()
        if self.running and self.step_delay > 0:
            time.sleep(self.step_delay)
        now = time.monotonic()
        batch = list(self.running.values())
        for seq in batch:
            token = seq.prompt_ids[len(seq.output_ids) % len(seq.prompt_ids)]
            outputs.append(self.outputs.append(seq, Sampled(token), now))
            if seq.is_finished:
                self._drop(seq)
        self._record_step(start, len(batch))
        return outputs

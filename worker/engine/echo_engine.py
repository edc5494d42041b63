"""A model-free engine for testing the serving fabric: it "generates" the prompt's tokens cyclically.

One token per running request per step, after a small sleep standing in for the forward pass.
Stops (stop ids, stop strings, max_tokens), cancellation and resume behave as in the real engines;
EOS does not stop it (a prompt may well contain the EOS token).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from worker.engine.api import EngineOutput, EngineRequest, EngineStats
from worker.engine.request import OutputProcessor, RequestStatus, Sequence
from worker.engine.sampler import Sampled


class EchoEngine:
    def __init__(self, tokenizer: Any, step_delay: float = 0.002, max_batch: int = 32,
                 max_model_len: int = 32768) -> None:
        self.tokenizer = tokenizer
        self.step_delay = step_delay
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.outputs = OutputProcessor(tokenizer, set(), max_model_len)
        self._lock = threading.Lock()
        self._incoming: deque[EngineRequest] = deque()
        self._cancels: set[str] = set()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._stats = EngineStats()

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

    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs: list[EngineOutput] = []
        with self._lock:
            incoming, self._incoming = self._incoming, deque()
            cancels, self._cancels = self._cancels, set()
        for req in incoming:
            seq = Sequence(req, self.tokenizer, len(self.tokenizer))
            error = self.outputs.check_admissible(seq)
            if error:
                outputs.append(OutputProcessor.finish(seq, "error", error))
            elif self.outputs.already_done(seq):
                outputs.append(OutputProcessor.finish(seq, "length"))
            else:
                self.waiting.append(seq)
        for seq in [s for s in self.waiting if s.request_id in cancels]:
            self.waiting.remove(seq)
            outputs.append(OutputProcessor.finish(seq, "cancelled"))
        for rid in cancels & self.running.keys():
            outputs.append(OutputProcessor.finish(self.running.pop(rid), "cancelled"))
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running[seq.request_id] = seq
        if self.running and self.step_delay > 0:
            time.sleep(self.step_delay)
        now = time.monotonic()
        for seq in list(self.running.values()):
            token = seq.prompt_ids[len(seq.output_ids) % len(seq.prompt_ids)]
            outputs.append(self.outputs.append(seq, Sampled(token), now))
            if seq.is_finished:
                del self.running[seq.request_id]
        self._stats.steps += 1
        self._stats.last_batch_size = len(self.running)
        self._stats.last_step_seconds = time.perf_counter() - start
        return outputs

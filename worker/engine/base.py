"""What every engine shares: the thread-safe intake and the per-step bookkeeping.

``add_request`` and ``cancel`` may be called from any thread; they only queue. The engine thread
applies them at the start of ``step()`` (``_intake``): new requests become ``Sequence``s, are checked
(token ids, context length), and are handed to the engine's own admission (``_admit``); cancels are
applied after that, so a request cancelled before its first step still gets its final
``"cancelled"`` output, and its slot and KV blocks are free before anything runs.

``SlotEngine`` adds the simple scheduling that the echo and simple engines use: a FIFO of waiting
requests and up to ``max_batch`` running ones. The paged engine schedules with its own
``Scheduler`` (token budget, KV blocks, preemption).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from worker.engine.api import EngineOutput, EngineRequest, EngineStats
from worker.engine.request import OutputProcessor, RequestStatus, Sequence

log = logging.getLogger(__name__)


class EngineBase:
    def __init__(self, tokenizer: Any, outputs: OutputProcessor, vocab_size: int, device: Any = "cpu",
                 stats: EngineStats | None = None) -> None:
        self.tokenizer = tokenizer
        self.outputs = outputs
        self.vocab_size = vocab_size
        self.device = device
        self._lock = threading.Lock()
        self._incoming: deque[EngineRequest] = deque()
        self._cancels: set[str] = set()
        self._stats = stats or EngineStats()

    # -- called from any thread --------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        with self._lock:
            self._incoming.append(request)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._incoming or self._cancels)
        return pending or self._busy()

    def _num_incoming(self) -> int:
        return len(self._incoming)

    # -- what an engine implements -----------------------------------------------------------------

    def _busy(self) -> bool:
        """Any admitted request still waiting or running."""
        raise NotImplementedError

    def _is_live(self, request_id: str) -> bool:
        raise NotImplementedError

    def _admit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _remove(self, request_id: str) -> Sequence | None:
        """Take a live request out (freeing whatever it holds); None if it is not live."""
        raise NotImplementedError

    # -- on the engine thread ----------------------------------------------------------------------

    def _intake(self, outputs: list[EngineOutput]) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, deque()
            cancels, self._cancels = self._cancels, set()
        for req in incoming:
            if self._is_live(req.request_id):
                log.warning("duplicate request id %s ignored", req.request_id)
                continue
            seq = Sequence(req, self.tokenizer, self.vocab_size, self.device)
            error = self.outputs.check_admissible(seq)
            if error:
                outputs.append(OutputProcessor.finish(seq, "error", error))
            elif self.outputs.already_done(seq):
                outputs.append(OutputProcessor.finish(seq, "length"))
            else:
                self._admit(seq)
        for rid in cancels:
            seq = self._remove(rid)
            if seq is not None:
                outputs.append(OutputProcessor.finish(seq, "cancelled"))

    def _record_step(self, started: float, batch_size: int) -> None:
        s = self._stats
        s.steps += 1
        s.last_batch_size = batch_size
        s.last_step_seconds = time.perf_counter() - started


class SlotEngine(EngineBase):
    """A FIFO of waiting requests feeding up to ``max_batch`` running ones."""

    def __init__(self, tokenizer: Any, outputs: OutputProcessor, vocab_size: int, device: Any = "cpu",
                 max_batch: int = 32) -> None:
        super().__init__(tokenizer, outputs, vocab_size, device)
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}

    def stats(self) -> EngineStats:
        self._stats.running = len(self.running)
        self._stats.waiting = len(self.waiting) + self._num_incoming()
        return self._stats

    def _busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _is_live(self, request_id: str) -> bool:
        return request_id in self.running or any(s.request_id == request_id for s in self.waiting)

    def _admit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _remove(self, request_id: str) -> Sequence | None:
        seq = self.running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self.waiting if s.request_id == request_id), None)
            if seq is not None:
                self.waiting.remove(seq)
        if seq is not None:
            self._release(seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        """Free what a request holds besides its slot (a cache, ...)."""

    def _fill_slots(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running[seq.request_id] = seq

    def _drop(self, seq: Sequence) -> None:
        """A running request finished (or failed): free its slot."""
        self.running.pop(seq.request_id, None)
        self._release(seq)

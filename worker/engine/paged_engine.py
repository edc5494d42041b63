"""The default engine: continuous batching over a paged KV cache with prefix caching.

Each ``step()``: take in new requests and cancellations (cancelled sequences free their blocks
here, before anything runs), let the scheduler pick decodes and prefill chunks within the token
budget, run one forward over the packed batch, sample the sequences whose context is complete, and
turn their tokens into outputs (stops, detokenization). Requests join and leave at every step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from worker.engine.api import EngineOutput, EngineStats
from worker.engine.base import EngineBase
from worker.engine.block_manager import BlockManager
from worker.engine.model_runner import ModelRunner, kv_bytes_per_block
from worker.engine.request import (
    OutputProcessor,
    RequestStatus,
    Sequence,
    eos_token_ids,
    model_max_len,
    output_vocab_size,
)
from worker.engine.sampler import Sampler
from worker.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class PagedEngine(EngineBase):
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 32, max_num_batched_tokens: int = 512,
                 kv_cache_memory: int = 512 * 1024**2, block_size: int = 16, num_blocks: int | None = None,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 seed: int | None = None, pack_weights: bool = True) -> None:
        dtype = next(model.parameters()).dtype
        if num_blocks is None:
            num_blocks = kv_cache_memory // kv_bytes_per_block(model.config, block_size, dtype)
        if num_blocks < 2:
            raise ValueError(f"KV cache memory {kv_cache_memory} bytes holds fewer than 2 blocks")
        self.max_model_len = min(max_model_len or model_max_len(model.config),
                                 model_max_len(model.config), num_blocks * block_size)
        vocab_size = output_vocab_size(model)
        outputs = OutputProcessor(tokenizer, eos_token_ids(model, tokenizer), self.max_model_len, vocab_size)
        self.runner = ModelRunner(model, num_blocks, block_size, pack_weights)
        super().__init__(tokenizer, outputs, vocab_size, self.runner.device, EngineStats(kv_blocks_total=num_blocks))
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_batch, max_num_batched_tokens)
        self.sampler = Sampler(self.device, seed)
        self.seqs: dict[str, Sequence] = {}  # live (waiting or running) by request id

    def stats(self) -> EngineStats:
        s = self._stats
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting) + self._num_incoming()
        s.kv_blocks_used = self.block_manager.num_used
        s.prefix_cache_queries = self.block_manager.prefix_queries
        s.prefix_cache_hits = self.block_manager.prefix_hits
        s.preemptions = self.scheduler.num_preemptions
        return s

    # -- intake (see EngineBase) -------------------------------------------------------------------

    def _busy(self) -> bool:
        return self.scheduler.has_work()

    def _is_live(self, request_id: str) -> bool:
        return request_id in self.seqs

    def _admit(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def _remove(self, request_id: str) -> Sequence | None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)  # frees its blocks now
        return seq

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs: list[EngineOutput] = []
        self._intake(outputs)
        batch = self.scheduler.schedule()
        for seq in batch.rejected:
            self.seqs.pop(seq.request_id, None)
            outputs.append(OutputProcessor.finish(seq, "error", "request does not fit in the KV cache"))
        if batch.items:
            try:
                logits = self.runner.forward(batch.items, batch.num_decodes)
                self._after_forward(batch.items, logits, outputs)
            except Exception as exc:  # fail this batch's requests, keep the engine alive
                log.exception("engine step failed")
                for seq, _ in batch.items:
                    if not seq.is_finished:
                        self._remove(seq.request_id)
                        outputs.append(OutputProcessor.finish(seq, "error", f"engine error: {exc}"))
        self._record_step(start, len(batch.items))
        return outputs

    def _after_forward(self, items: list[tuple[Sequence, int]], logits: torch.Tensor,
                       outputs: list[EngineOutput]) -> None:
        sampling: list[Sequence] = []
        for seq, n in items:
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(seq)
        if not sampling:
            return
        sampled = self.sampler(logits, [s.sample_row for s in sampling])
        now = time.monotonic()
        for seq, smp in zip(sampling, sampled, strict=True):
            outputs.append(self.outputs.append(seq, smp, now))
            if seq.is_finished:
                self._remove(seq.request_id)

    def check_invariants(self) -> None:
        """For tests: block accounting matches the live sequences."""
        live = [s for s in self.scheduler.running if s.status is RequestStatus.RUNNING]
        assert all(not s.block_table for s in self.scheduler.waiting)
        self.block_manager.check_invariants(live)

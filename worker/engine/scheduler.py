"""Which sequences run in the next step, and how many tokens each computes.

Every step: (1) running sequences that are decoding get one token each, first come first served;
a decode that needs a new block and finds none preempts the most recently admitted sequence (its
blocks are freed and it recomputes later), possibly itself; (2) sequences part-way through a
chunked prefill get their next chunk; (3) waiting sequences are admitted while there are batch
slots, blocks for their whole context and token budget, except those whose next prompt block a
running sequence is computing (they wait for it to be cached and share it). Prefill chunks share
the per-step token budget, so a long prompt cannot stall everyone's next token.

No deadlock: a sequence never needs more blocks than the pool holds (the engine caps the context
length at the pool's size), so a lone running sequence can always proceed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.request import RequestStatus, Sequence


@dataclass
class ScheduledBatch:
    """``(seq, number of tokens to compute)``, decodes first; ``preempted`` for the stats."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[Sequence] = field(default_factory=list)  # can never fit: the engine fails them

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_batch = max(1, max_batch)
        self.max_num_batched_tokens = max(max_num_batched_tokens, self.max_batch)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; preemption takes from the end
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = RequestStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = RequestStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # 1. decodes
        for seq in list(self.running):
            if seq.status is not RequestStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            while not self.bm.append_slot(seq):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.items.append((seq, 1))
                scheduled.add(id(seq))
                budget -= 1
        batch.num_decodes = len(batch.items)
        # 2. running prefills (chunked)
        for seq in self.running:
            if budget <= 0:
                break
            need = seq.num_tokens - seq.num_computed_tokens
            if id(seq) not in scheduled and need > 1:
                n = min(need, budget)
                batch.items.append((seq, n))
                budget -= n
        # 3. admissions (not in a step that had to preempt: blocks are short); a request whose prompt
        # blocks a running sequence is computing waits a step or two and takes them from the cache
        held: list[Sequence] = []
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self.bm.prefix_in_flight(seq, self.running):
                held.append(self.waiting.popleft())
                continue
            if not self.bm.allocate(seq):
                if not self.running and self.bm.num_free == self.bm.num_blocks:
                    self.waiting.popleft()  # larger than the whole pool: can never run
                    batch.rejected.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.items.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))
        return batch

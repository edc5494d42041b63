"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

A block holds ``block_size`` consecutive token positions of one or more sequences (shared blocks
hold identical prefixes). A *full* block whose KV has been computed is registered under a chain
hash of all tokens up to its end, so a later request with the same prefix reuses it instead of
recomputing. Freed blocks keep their hash and sit in an LRU free list: they are revived on a hit
and overwritten only when no never-used or older block is left.

Only blocks whose KV is already computed are registered (``register_computed``), so a request can
never reuse a block that another request is still filling. Instead, the scheduler holds back a
request whose next uncached block another running sequence is computing right now
(``prefix_in_flight``): requests that arrive together with one prompt (``n`` choices, a burst with
one system prompt) compute it once and share its blocks, rather than each computing its own copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from worker.engine.request import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the block's own tokens, to rule out hash collisions


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, first out first: never-used / unhashed ones in front, cached ones by age.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found cached

    # -- accounting --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------------------------

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block id, hash) of the leading full blocks of ``seq`` found in the cache.

        At least one token is always left to compute (its logits give the next token).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[int, int]] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            h = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append((block_id, h))
            parent = h
        return hits

    def prompt_hashes(self, seq: Sequence) -> list[int]:
        """Chain hashes of the prompt's full blocks that a request may take from the cache (all but
        one token is cacheable: the last one is always computed)."""
        if seq.prompt_block_hashes is None:
            bs, hashes, parent = self.block_size, [], None
            for i in range((seq.num_prompt_tokens - 1) // bs):
                parent = chain_hash(parent, tuple(seq.prompt_ids[i * bs:(i + 1) * bs]))
                hashes.append(parent)
            seq.prompt_block_hashes = hashes
        return seq.prompt_block_hashes

    def prefix_in_flight(self, seq: Sequence, running: list[Sequence]) -> bool:
        """True when the first prompt block of waiting ``seq`` that is not cached yet is being
        computed by one of ``running`` (same chain hash, not yet registered): wait for it."""
        if not self.enable_prefix_caching:
            return False
        hashes = self.prompt_hashes(seq)
        k = 0
        while k < len(hashes) and hashes[k] in self.hash_to_block:
            k += 1
        if k == len(hashes):
            return False
        for other in running:
            if len(other.block_hashes) <= k < len(other_hashes := self.prompt_hashes(other)) \
                    and other_hashes[k] == hashes[k]:
                return True
        return False

    def allocate(self, seq: Sequence) -> bool:
        """Give a new (or preempted) ``seq`` blocks for all its tokens, reusing cached prefix blocks.

        Returns False, changing nothing, when there are not enough free blocks.
        """
        assert not seq.block_table, "sequence already has blocks"
        hits = self._cached_prefix(seq)
        revived = sum(1 for b, _ in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        if revived + fresh > len(self.free):
            return False
        for block_id, _ in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = [b for b, _ in hits] + [self._take_free() for _ in range(fresh)]
        seq.block_hashes = [h for _, h in hits]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens
        return True

    def append_slot(self, seq: Sequence) -> bool:
        """Make sure the block table covers every token of ``seq``; False if no block is free."""
        while len(seq.block_table) * self.block_size < seq.num_tokens:
            if not self.free:
                return False
            seq.block_table.append(self._take_free())
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = seq.block_hashes
        while len(hashes) < full:
            i = len(hashes)
            tokens = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def free_seq(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (shared ones stay with their other users)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s blocks (for ``n`` > 1); the caller copies a partly
        filled last block before either sequence writes to it (see ``PagedEngine``)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def check_invariants(self, live: list[Sequence]) -> None:
        """For tests: reference counts equal the block tables' uses; free list = unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (block, counts[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free), block
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h

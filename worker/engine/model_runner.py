"""One forward over a ragged batch, on an unmodified transformers model, with a paged KV cache.

How it plugs into transformers (no model code is forked):

* the batch is packed into one row: ``input_ids`` and ``position_ids`` of shape ``[1, T]``, every
  sequence's new tokens one after the other with their own positions (RoPE and GPT-2's learned
  positions both read ``position_ids``);
* an attention function registered in transformers' ``AttentionInterface`` as ``"spindle_paged"``
  receives each layer's query/key/value (after RoPE), writes the new keys/values into the block
  pool and attends over each sequence's blocks. Because that name has no mask function, the model
  builds no attention mask at all;
* the per-step metadata (slot mapping, block tables, lengths) travels as a keyword argument that
  the model passes through to the attention function untouched;
* ``logits_to_keep`` (a tensor of positions) makes the LM head run only where a token is sampled.

Attention: decoding sequences are batched in SDPA calls over their gathered blocks, with the
query heads grouped by KV head (no ``repeat_kv`` copy). They are packed shortest context first and
split into length buckets (``decode_buckets``), each padded only to its own longest context: at
batch 32 with contexts of 30-500 tokens, gathering and attending over one batch-wide padding was
~45% of a step. Each prefill chunk gets its own call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.cpu_linear import maybe_pack
from worker.engine.request import Sequence

ATTN_NAME = "spindle_paged"


@dataclass
class PrefillSegment:
    start: int  # first row in the packed batch
    length: int  # new tokens
    context: int  # tokens already in the cache before this chunk
    block_ids: torch.Tensor  # [blocks] long: the blocks holding positions [0, context + length)


@dataclass
class DecodeBucket:
    """Decode rows ``[start, start + count)`` whose contexts fit in ``max_blocks`` blocks: one gather
    and one SDPA call per layer, padded to this bucket's longest context rather than the batch's."""

    start: int
    count: int
    max_blocks: int
    block_ids: torch.Tensor  # [count * max_blocks] long, padded with block 0
    positions: torch.Tensor  # [count] long


@dataclass
class AttnMetadata:
    """Everything the attention function needs for one step, built once and shared by all layers."""

    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes
    num_decodes: int  # the first rows are decodes, one token each, shortest context first
    decode_buckets: list[DecodeBucket]
    prefills: list[PrefillSegment]
    group: int  # query heads per KV head
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, b: int, window: int | None) -> torch.Tensor:
        """Additive mask ``[n, 1, 1, span]`` for bucket ``b``: 0 where a decode attends, -inf elsewhere."""
        key = ("decode", b, window)
        if key not in self._masks:
            bucket = self.decode_buckets[b]
            span = bucket.max_blocks * self.k_cache[0].shape[1]
            keys = torch.arange(span, device=self.slot_mapping.device)
            pos = bucket.positions[:, None]
            ok = keys[None, :] <= pos
            if window:
                ok &= keys[None, :] > pos - window
            self._masks[key] = _additive(ok, self.dtype).view(bucket.count, 1, 1, span)
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor:
        """Additive causal mask ``[G * n, context + n]`` for prefill segment ``i`` (heads grouped)."""
        key = ("prefill", i, window)
        if key not in self._masks:
            seg = self.prefills[i]
            total = seg.context + seg.length
            dev = self.slot_mapping.device
            q_pos = torch.arange(seg.context, total, device=dev)[:, None]
            k_pos = torch.arange(total, device=dev)[None, :]
            ok = k_pos <= q_pos
            if window:
                ok &= k_pos > q_pos - window
            self._masks[key] = _additive(ok, self.dtype).repeat(self.group, 1)
        return self._masks[key]


# Padding a decode to its bucket's longest context costs a gather and an attention pass over the
# padding; a bucket costs a few extra ops per layer. In blocks of padding, measured on the CPU:
# one more bucket pays for itself when it saves more than ~3 padded blocks.
BUCKET_COST_BLOCKS = 3


def decode_buckets(lengths: list[int], bucket_cost: int = BUCKET_COST_BLOCKS) -> list[tuple[int, int]]:
    """Split ascending block counts into contiguous buckets ``(start, count)`` that minimise the
    padded blocks gathered plus ``bucket_cost`` per bucket (an exact dynamic programme; n <= MAX_BATCH)."""
    n = len(lengths)
    best = [0] + [1 << 60] * n  # best[j]: cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + bucket_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out = []
    j = n
    while j > 0:
        out.append((cut[j], j - cut[j]))
        j = cut[j]
    return out[::-1]


def _additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function. query ``[1, H, T, D]``, key/value ``[1, KVH, T, D]``."""
    meta: AttnMetadata | None = kwargs.get("spindle_meta")
    if meta is None:  # the model used outside the engine (e.g. ``generate``): plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layer = module.layer_idx
    k_cache, v_cache = meta.k_cache[layer], meta.v_cache[layer]
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    window = kwargs.get("sliding_window")
    slot_shape = (-1, kv_heads, dim)

    k_cache.view(slot_shape).index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.view(slot_shape).index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    out = query.new_empty(tokens, heads, dim)
    for b, bucket in enumerate(meta.decode_buckets):
        # One query per sequence; its G query heads per KV head become G "query rows".
        n, rows = bucket.count, slice(bucket.start, bucket.start + bucket.count)
        q = query[0, :, rows, :].transpose(0, 1).reshape(n, kv_heads, group, dim)
        span = bucket.max_blocks * k_cache.shape[1]
        k = k_cache.index_select(0, bucket.block_ids).view(n, span, kv_heads, dim).transpose(1, 2)
        v = v_cache.index_select(0, bucket.block_ids).view(n, span, kv_heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=meta.decode_mask(b, window),
                                           scale=scale)
        out[rows] = o.reshape(n, heads, dim)
    for i, seg in enumerate(meta.prefills):
        n, total = seg.length, seg.context + seg.length
        rows = slice(seg.start, seg.start + n)
        if seg.context == 0:
            k, v = key[0, :, rows, :], value[0, :, rows, :]
        else:
            k = k_cache.index_select(0, seg.block_ids).view(slot_shape)[:total].transpose(0, 1).to(query.dtype)
            v = v_cache.index_select(0, seg.block_ids).view(slot_shape)[:total].transpose(0, 1).to(query.dtype)
        # Group the query heads by KV head: [1, KVH, G*n, D] against [1, KVH, total, D] (no repeat_kv
        # copy). 4-D on purpose: torch sends 3-D inputs to its unfused "math" attention, 5-6x slower
        # on the CPU (a 512-token chunk: 7.8 ms per layer against 1.2 ms).
        qg = query[0, :, rows, :].reshape(1, kv_heads, group * n, dim)
        o = F.scaled_dot_product_attention(qg, k[None], v[None], attn_mask=meta.prefill_mask(i, window), scale=scale)
        out[rows] = o.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)
    return out.unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a transformers config (Llama, Qwen2, Mistral, GPT-2 ...)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def kv_bytes_per_block(config: Any, block_size: int, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_geometry(config)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * block_size * kv_heads * head_dim * elem


class ModelRunner:
    """Owns the model and the KV block pool; ``forward`` runs one scheduled batch."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, pack_weights: bool = True) -> None:
        register_attention()
        self.model = model.eval()
        self.packed_weights = maybe_pack(model, pack_weights)
        self.model.set_attn_implementation(ATTN_NAME)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        layers, kv_heads, head_dim = kv_geometry(model.config)
        self.group = model.config.num_attention_heads // kv_heads
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]

    @torch.inference_mode()
    def forward(self, items: list[tuple[Sequence, int]], num_decodes: int) -> torch.Tensor:
        """Compute ``n`` new tokens for each ``(seq, n)``; return logits ``[S, V]`` for the sequences
        whose context is complete after this step (they sample), in batch order.

        The decodes are packed shortest context first, so that length buckets are contiguous rows;
        ``logits_to_keep`` lists the sampling rows in batch order, so the logits come out in it."""
        bs = self.block_size
        dev = self.device
        order = sorted(range(num_decodes), key=lambda i: len(items[i][0].block_table))
        order += range(num_decodes, len(items))
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}  # item index -> its last row, for those that sample
        prefills: list[PrefillSegment] = []
        for i in order:
            seq, n = items[i]
            start = seq.num_computed_tokens
            row = len(input_ids)
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == seq.num_tokens:
                last_row[i] = row + n - 1
            if i >= num_decodes:
                used = torch.tensor(table[: -(-(start + n) // bs)], dtype=torch.long, device=dev)
                prefills.append(PrefillSegment(row, n, start, used))
        buckets = []
        tables = [items[i][0].block_table for i in order[:num_decodes]]
        for start, count in decode_buckets([len(t) for t in tables]):
            width = len(tables[start + count - 1])
            flat = [b for t in tables[start:start + count] for b in t + [0] * (width - len(t))]
            buckets.append(DecodeBucket(start, count, width, torch.tensor(flat, dtype=torch.long, device=dev),
                                        torch.tensor(positions[start:start + count], dtype=torch.long, device=dev)))
        meta = AttnMetadata(
            k_cache=self.k_cache, v_cache=self.v_cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), num_decodes=num_decodes,
            decode_buckets=buckets, prefills=prefills, group=self.group, dtype=self.dtype,
        )
        keep = [last_row[i] for i in range(len(items)) if i in last_row]
        out = self.model(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=dev),
            position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
            spindle_meta=meta,
        )
        return out.logits[0]

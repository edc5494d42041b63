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

Attention: decoding sequences are batched in one SDPA call over their gathered blocks, with the
query heads grouped by KV head (no ``repeat_kv`` copy); each prefill chunk gets its own call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.request import Sequence

ATTN_NAME = "spindle_paged"


@dataclass
class PrefillSegment:
    start: int  # first row in the packed batch
    length: int  # new tokens
    context: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # [blocks] long


@dataclass
class AttnMetadata:
    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes
    num_decodes: int  # the first rows are decodes, one token each
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] long
    decode_key_mask: torch.Tensor | None  # [D, 1, 1, max_blocks * block_size] bool, True = attend
    decode_positions: torch.Tensor | None  # [D] long
    prefills: list[PrefillSegment]


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
    block_size = k_cache.shape[1]

    flat_k = k_cache.view(-1, kv_heads, dim)
    flat_v = v_cache.view(-1, kv_heads, dim)
    flat_k.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(flat_k.dtype))
    flat_v.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(flat_v.dtype))

    out = query.new_empty(tokens, heads, dim)
    nd = meta.num_decodes
    if nd:
        q = query[0, :, :nd, :].transpose(0, 1).reshape(nd, kv_heads, group, dim)
        bt = meta.decode_block_tables
        span = bt.shape[1] * block_size
        k = k_cache[bt].view(nd, span, kv_heads, dim).transpose(1, 2)
        v = v_cache[bt].view(nd, span, kv_heads, dim).transpose(1, 2)
        mask = meta.decode_key_mask
        if window:
            keys = torch.arange(span, device=query.device)
            mask = mask & (keys > meta.decode_positions[:, None] - window).view(nd, 1, 1, span)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
        out[:nd] = o.reshape(nd, heads, dim)
    for seg in meta.prefills:
        n, ctx = seg.length, seg.context
        total = ctx + n
        q = query[0, :, seg.start:seg.start + n, :]  # [H, n, D]
        if ctx == 0:
            k = key[0, :, seg.start:seg.start + n, :]
            v = value[0, :, seg.start:seg.start + n, :]
        else:
            k = k_cache[seg.block_table].view(-1, kv_heads, dim)[:total].transpose(0, 1).to(q.dtype)
            v = v_cache[seg.block_table].view(-1, kv_heads, dim)[:total].transpose(0, 1).to(q.dtype)
        q_pos = torch.arange(ctx, total, device=query.device)
        k_pos = torch.arange(total, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if window:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        # Group the query heads by KV head: [KVH, G*n, D] against [KVH, total, D].
        qg = q.reshape(kv_heads, group * n, dim)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(group, 1), scale=scale)
        out[seg.start:seg.start + n] = o.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)
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

    def __init__(self, model: Any, num_blocks: int, block_size: int) -> None:
        register_attention()
        self.model = model.eval()
        self.model.set_attn_implementation(ATTN_NAME)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        layers, kv_heads, head_dim = kv_geometry(model.config)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]

    @torch.inference_mode()
    def forward(self, items: list[tuple[Sequence, int]], num_decodes: int) -> torch.Tensor:
        """Compute ``n`` new tokens for each ``(seq, n)``; return logits ``[S, V]`` for the sequences
        whose context is complete after this step (they sample), in batch order."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        prefills: list[PrefillSegment] = []
        for i, (seq, n) in enumerate(items):
            start = seq.num_computed_tokens
            row = len(input_ids)
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == seq.num_tokens:
                keep.append(row + n - 1)
            if i >= num_decodes:
                used = table[: -(-(start + n) // bs)]
                prefills.append(PrefillSegment(row, n, start, torch.tensor(used, dtype=torch.long, device=self.device)))
        dev = self.device
        meta = AttnMetadata(self.k_cache, self.v_cache, torch.tensor(slots, dtype=torch.long, device=dev), num_decodes,
                            None, None, None, prefills)
        if num_decodes:
            decode_seqs = [seq for seq, _ in items[:num_decodes]]
            max_blocks = max(len(s.block_table) for s in decode_seqs)
            tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in decode_seqs]
            pos = torch.tensor(positions[:num_decodes], device=dev)
            meta.decode_block_tables = torch.tensor(tables, device=dev)
            meta.decode_positions = pos
            keys = torch.arange(max_blocks * bs, device=dev)
            meta.decode_key_mask = (keys[None, :] <= pos[:, None]).view(num_decodes, 1, 1, -1)
        out = self.model(
            input_ids=torch.tensor([input_ids], device=dev),
            position_ids=torch.tensor([positions], device=dev),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
            spindle_meta=meta,
        )
        return out.logits[0]

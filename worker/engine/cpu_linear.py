"""Pre-packed oneDNN weights for the linear layers of a float32 or bfloat16 model on the CPU.

Why: at decode batch sizes a CPU step is mostly matrix-vector work over the weights. The default
path (``F.linear`` on an unpacked ``[out, in]`` weight: MKL for float32, a slower generic route for
bfloat16) reads them well below memory bandwidth. oneDNN with the weight reordered once into its
blocked layout, the same call torch's inductor emits for CPU linears, was measured for a 1536 x 576
weight (40 of them, beyond the L3), per call:

| rows | float32 `F.linear` / packed (AVX2 EPYC) | bfloat16 `F.linear` / packed (AMX Xeon) |
|---|---|---|
| 1 | 280 / 160 us | 142 / 83 us |
| 8 | 401 / 240 us | 138 / 80 us |
| 32 | 693 / 479 us | 447 / 114 us |
| 256 | 3,027 / 2,750 us | 325 / 248 us |

The numbers are not bit-identical with ``F.linear`` (another summation order), which is within
what two BLAS builds differ by.

How: every ``nn.Linear`` (and GPT-2's ``Conv1D``) module is swapped for a ``PackedLinear`` that
holds the packed weight; the model's own code is unchanged and calls the module as before. Tied
output embeddings keep their embedding: the LM head gets a packed copy (``vocab x hidden`` more
elements; 113 MB in float32 for SmolLM2-135M). bfloat16 is packed only where the CPU runs it
natively (AVX512-BF16 or AMX); without those instructions oneDNN would emulate it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    from worker.engine.loader import cpu_has_fast_bf16

    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_fast_bf16())


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` reordered once for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # The batch-size hint None picks the layout that was fastest from 1 to 256 rows.
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is [in, out]
        return module.weight.t(), module.bias
    return None


def pack_linear_weights(model: nn.Module) -> int:
    """Swap the model's CPU linear layers whose dtype ``can_pack`` for ``PackedLinear`` in place; returns how many."""
    swaps: list[tuple[nn.Module, str, PackedLinear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            wb = _weight_and_bias(child)
            if wb is None or not can_pack(wb[0].device, wb[0].dtype):
                continue
            swaps.append((parent, name, PackedLinear(*wb)))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    log.info("packed %d linear layers for oneDNN", len(swaps))
    return len(swaps)


def maybe_pack(model: Any, enabled: bool = True) -> bool:
    """Pack when ``enabled`` and the model is on the CPU in a dtype ``can_pack``; True if it did."""
    param = next(model.parameters())
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return True  # already packed (an engine built twice on one model)
    if not enabled or not can_pack(param.device, param.dtype):
        return False
    return pack_linear_weights(model) > 0

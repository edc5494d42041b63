"""Pre-packed oneDNN weights for the linear layers of a float32 model on the CPU.

Why: at decode batch sizes a CPU step is mostly matrix-vector work over the weights, and the
default float32 path (MKL ``addmm`` on an unpacked ``[out, in]`` weight) reads them at ~12 GB/s on
the AMD hosts we measured. oneDNN with the weight reordered once into its blocked layout, the
same call torch's inductor emits for CPU linears, was measured on a 2-core AVX2 EPYC for a
1536 x 576 float32 weight (40 of them, beyond the L3) at 160 / 240 / 479 / 2,750 us for batch
1 / 8 / 32 / 256 rows, against 280 / 401 / 693 / 3,027 us for ``F.linear``: 1.1-1.75x, most at
batch 1. The numbers are not bit-identical with ``F.linear`` (different summation order, ~1e-6
relative), which is within what two BLAS builds differ by.

How: every ``nn.Linear`` (and GPT-2's ``Conv1D``) module is swapped for a ``PackedLinear`` that
holds the packed weight; the model's own code is unchanged and calls the module as before. Tied
output embeddings keep their embedding: the LM head gets a packed copy (``vocab x hidden`` more
floats; 113 MB for SmolLM2-135M). Only float32 on the CPU: bfloat16 oneDNN needs AVX512-BF16/AMX,
which the machines we could measure on lack, so it is left to ``F.linear`` until measured.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


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
    """Swap the model's float32 linear layers for ``PackedLinear`` in place; returns how many."""
    swaps: list[tuple[nn.Module, str, PackedLinear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            wb = _weight_and_bias(child)
            if wb is None or wb[0].dtype != torch.float32 or wb[0].device.type != "cpu":
                continue
            swaps.append((parent, name, PackedLinear(*wb)))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    log.info("packed %d linear layers for oneDNN", len(swaps))
    return len(swaps)


def maybe_pack(model: Any, enabled: bool = True) -> bool:
    """Pack when ``enabled`` and the model is float32 on the CPU; True if it did."""
    param = next(model.parameters())
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return True  # already packed (an engine built twice on one model)
    if not enabled or not can_pack(param.device, param.dtype):
        return False
    return pack_linear_weights(model) > 0

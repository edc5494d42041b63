"""Int8 weight-only quantization: the storage format, the module that runs it, and its loader.

Format (an artifact written by the ``int8`` pass):

- every quantized Linear (or GPT-2 ``Conv1D``) ``<m>`` stores ``<m>.weight`` as int8 ``[out, in]``
  (Linear layout, also for Conv1D) and ``<m>.weight_scale`` as float32 ``[out]``: one symmetric scale
  per output channel, ``w ≈ weight * weight_scale[:, None]``;
- everything else (embeddings, norms, biases, a tied ``lm_head``) keeps the source dtype;
- ``config.json`` gets ``quantization_config = {"quant_method": "spindle-int8", "bits": 8,
  "scheme": "weight_only_per_channel_symmetric", "modules": [<m>, ...]}``.

Transformers does not know ``spindle-int8``: load these artifacts with :func:`load_quantized`, which
returns an ordinary transformers model whose quantized layers are :class:`Int8Linear`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.plan import QUANT_METHOD, is_quantized_config

SCALE_SUFFIX = "weight_scale"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (int8 ``[out, in]``, float32 scale ``[out]``), symmetric per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """``y = x @ (weight * weight_scale)^T + bias`` with int8 ``weight`` and per-row ``weight_scale``.

    On CPU it uses torch's weight-only int8 matmul (``aten._weight_int8pack_mm``, the kernel gpt-fast
    uses); elsewhere, or if that kernel is missing, it casts the int8 weight to the activation dtype
    and applies the scale to the output (``(x @ q^T) * s`` equals ``x @ (q * s)^T`` row by row).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer(SCALE_SUFFIX, torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._packed_ok = hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale.to(x.dtype)
        if self._packed_ok and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                flat = x.reshape(-1, self.in_features).contiguous()
                y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scale)
                y = y.reshape(*x.shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):
                self._packed_ok = False
                y = F.linear(x, self.weight.to(x.dtype)) * scale
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _linear_like(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, has_bias) for nn.Linear and transformers' Conv1D (weight stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_features, out_features = module.weight.shape
        return in_features, out_features, module.bias is not None
    return None


def quantizable_modules(model: nn.Module) -> dict[str, bool]:
    """Names of the Linear/Conv1D modules worth quantizing -> whether the weight is Conv1D-transposed.

    Skipped: layers whose weight is shared with another module (a tied ``lm_head`` is the input
    embedding, which stays in float) and layers too small to matter (fewer than 16 input features).
    """
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    out: dict[str, bool] = {}
    for name, module in model.named_modules():
        shape = _linear_like(module)
        if shape is None or shape[0] < 16 or seen.get(id(module.weight), 0) > 1:
            continue
        out[name] = not isinstance(module, nn.Linear)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _torch_dtype(dtype: Any, config_dtype: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        dtype = config_dtype or "float32"
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def read_state_dict(model_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(shard), device=str(device)))
    return state


def load_quantized(model_dir: Path | str, dtype: Any = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """A transformers causal LM from an int8 artifact, on ``device``, computing in ``dtype``, in eval mode.

    ``dtype`` is a torch dtype or its name (``"auto"`` = the config's dtype). Non-quantized tensors
    are cast to it; int8 weights stay int8 and are dequantized inside :class:`Int8Linear`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if not is_quantized_config(raw):
        raise ValueError(f"{model_dir} is not a {QUANT_METHOD} artifact (no matching quantization_config)")
    qcfg = raw["quantization_config"]
    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers must not look for a quantizer it does not have
    torch_dtype = _torch_dtype(dtype, str(raw.get("dtype") or raw.get("torch_dtype") or ""))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    for name in qcfg["modules"]:
        shape = _linear_like(model.get_submodule(name))
        if shape is None:
            raise ValueError(f"quantized module {name!r} is not a Linear layer in {type(model).__name__}")
        in_f, out_f, has_bias = shape
        _set_module(model, name, Int8Linear(in_f, out_f, bias=has_bias, dtype=torch_dtype))
    state = read_state_dict(model_dir)
    for key, t in state.items():
        if t.is_floating_point() and not key.endswith(SCALE_SUFFIX):
            state[key] = t.to(torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"int8 artifact {model_dir} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.config.quantization_config = qcfg
    return model.to(device).eval()


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)

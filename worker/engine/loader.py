"""Build an engine from an artifact directory: ``load_engine("paged", path, "auto", "auto", settings)``."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

from worker.engine.api import Engine

log = logging.getLogger(__name__)

ENGINE_KINDS = ("paged", "simple", "echo")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """ "512MiB" -> 536870912; plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_device(device: str) -> str:
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (2-3x fp32 on the machines we measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if flags:
        return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    try:  # non-Linux: ask torch what the CPU can do
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    except Exception:
        return False


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in ("", "auto"):
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unsupported dtype {dtype!r}: use auto, bfloat16, float16 or float32")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _get(settings: Any, name: str, default: Any) -> Any:
    return getattr(settings, name, default) if settings is not None else default


def load_model(model_dir: Path | str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from an artifact directory, on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if is_int8_artifact(model_dir):  # the optimizer's int8 weight-only format
        from optimizer.quant import load_quantized

        return load_quantized(model_dir, torch_dtype, device), tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
    model.to(device).eval()
    return model, tokenizer


def is_int8_artifact(model_dir: Path | str) -> bool:
    """True for an artifact written by the optimizer's int8 pass (plain from_pretrained would load garbage)."""
    import json

    from optimizer.plan import is_quantized_config

    config = Path(model_dir) / "config.json"
    return config.is_file() and is_quantized_config(json.loads(config.read_text()))


def load_engine(kind: str, model_dir: Path | str, device: str = "auto", dtype: str = "auto",
                settings: Any = None) -> Engine:
    """The engine ``kind`` ("paged", "simple" or "echo") for the model in ``model_dir``.

    ``settings`` is a ``WorkerSettings`` (or anything with the same attribute names); missing
    attributes take their defaults.
    """
    kind = (kind or "paged").lower()
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}: use one of {', '.join(ENGINE_KINDS)}")
    threads = int(_get(settings, "torch_threads", 0) or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    max_batch = int(_get(settings, "max_batch", 32))
    if kind == "echo":
        from transformers import AutoConfig, AutoTokenizer

        from worker.engine.echo_engine import EchoEngine
        from worker.engine.request import model_max_len

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        try:
            max_len = model_max_len(AutoConfig.from_pretrained(str(model_dir)))
        except Exception:
            max_len = 32768
        return EchoEngine(tokenizer, step_delay=float(_get(settings, "echo_step_delay", 0.002)),
                          max_batch=max_batch, max_model_len=max_len)
    model, tokenizer = load_model(model_dir, device, dtype)
    if kind == "paged":
        try:
            from worker.engine.paged_engine import PagedEngine
        except ImportError:  # pragma: no cover - only while the paged engine is being built
            log.warning("paged engine unavailable; using the simple engine")
        else:
            return PagedEngine(
                model, tokenizer, max_batch=max_batch,
                max_num_batched_tokens=int(_get(settings, "max_num_batched_tokens", 512)),
                kv_cache_memory=parse_bytes(_get(settings, "kv_cache_memory", "512MiB")),
                block_size=int(_get(settings, "kv_block_size", 16)),
                pack_weights=bool(_get(settings, "cpu_packed_weights", True)),
            )
    from worker.engine.simple_engine import SimpleEngine

    return SimpleEngine(model, tokenizer, max_batch=max_batch)

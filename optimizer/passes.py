"""Optimizer passes: each reads an artifact and writes a new one next to it, gated on quality.

``optimize(store, "m", ["bf16", "int8"])`` writes ``m-bf16`` and ``m-int8``. Every pass starts
from the source (int8 from the source's own precision, not from bf16), builds its output in the
volume's ``.tmp/``, loads it back the way the engine will, runs the quality gate against the source
on held-out text, writes ``manifest.json`` with the gate's numbers and only then renames it into
place. A pass that fails its gate leaves nothing servable behind.

Passes:
- ``safetensors``: re-save as safetensors in the source dtype (for models imported as pickled
  ``.bin`` with ALLOW_PICKLE_WEIGHTS; for a safetensors source it normalizes the layout);
- ``bf16`` / ``fp16``: dtype conversion of every floating-point tensor;
- ``int8``: int8 weight-only, per-output-channel symmetric (``optimizer.quant``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optimizer import quality
from optimizer.plan import PASSES, QUANT_METHOD, GateFailed, OptimizeError, PassResult, check_request
from optimizer.quant import SCALE_SUFFIX, _tied_keys, load_quantized, quantizable_modules, quantize_weight
from protocol.artifacts import MANIFEST, ArtifactStore, Manifest, read_manifest, write_manifest

__all__ = ["PASSES", "GateFailed", "OptimizeError", "PassResult", "optimize"]

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
MAX_SHARD_BYTES = 4 * 1024**3

Progress = Callable[..., None]


def _source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def load_source(src: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((src / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=_source_dtype(config))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    return model.eval(), tokenizer


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, held-out text ...: every top-level file that is not weights."""
    for p in src.iterdir():
        if (p.is_file() and not p.is_symlink() and p.name not in (MANIFEST, "config.json")
                and not p.name.endswith(WEIGHT_SUFFIXES)):
            shutil.copy2(p, dst / p.name)


def save_state(state: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index past ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build_dtype(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """safetensors / bf16 / fp16: load in the target dtype and let transformers save it, so tied
    weights, key names and the config's dtype come out right."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    model.save_pretrained(str(dst))
    copy_side_files(src, dst)


def build_int8(model: Any, src: Path, dst: Path) -> None:
    targets = quantizable_modules(model)
    tied = _tied_keys(model)
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in targets:
            w = t.t() if targets[module] else t  # Conv1D keeps [in, out]; store Linear's [out, in]
            q, s = quantize_weight(w)
            state[key] = q
            state[f"{module}.{SCALE_SUFFIX}"] = s
        else:
            state[key] = t.detach().clone()
    save_state(state, dst)
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8,
                                     "scheme": "weight_only_per_channel_symmetric",
                                     "modules": sorted(targets)}
    (dst / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(str(dst))
    copy_side_files(src, dst)


def load_candidate(pass_name: str, path: Path, source_dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    if pass_name == "int8":
        return load_quantized(path, dtype=source_dtype, device="cpu")
    dtype = DTYPES.get(pass_name, source_dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _estimate_bytes(src_manifest: Manifest, pass_name: str) -> int:
    size = src_manifest.size_bytes
    return {"bf16": size // 2, "fp16": size // 2, "int8": size // 3}.get(pass_name, size)


def _check_space(root: Path, need: int, reserve: int) -> None:
    root.mkdir(parents=True, exist_ok=True)  # a fresh volume (the first optimize of a bundled model)
    free = shutil.disk_usage(root).free
    if free - need < reserve:
        raise OptimizeError(f"not enough disk space on {root}: need {need} bytes plus a reserve of "
                            f"{reserve}, {free} free")


def optimize(store: ArtifactStore, name: str, passes: list[str], *, gates: dict[str, quality.Gate] | None = None,
             progress: Progress | None = None, max_eval_tokens: int = 1024, min_free_bytes: int = 0,
             ) -> list[PassResult]:
    """Run ``passes`` on model ``name``; raises GateFailed if any gate failed (the others are kept)."""
    report = progress or (lambda **kw: None)
    gates = {**quality.DEFAULT_GATES, **(gates or {})}
    src, outputs = check_request(store, name, passes)
    src_manifest = read_manifest(src)
    report(stage="loading", message=f"loading {name}", fraction=0.0)
    model, tokenizer = load_source(src)
    source_dtype = next(model.parameters()).dtype
    text, text_source = quality.heldout_text(src)
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 512))
    chunks = quality.token_chunks(tokenizer, text, max_eval_tokens, min(ctx, 512))
    report(stage="evaluating", message=f"scoring {name} on held-out text ({text_source})", fraction=0.05)
    source_scores = quality.score(model, chunks)
    results: list[PassResult] = []
    for i, (pass_name, out) in enumerate(zip(passes, outputs, strict=True)):
        frac = 0.1 + 0.9 * i / len(passes)
        _check_space(store.root, _estimate_bytes(src_manifest, pass_name), min_free_bytes)
        tmp = store.tmp_dir() / f"opt-{out}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            report(stage="converting", message=f"{pass_name}: writing {out}", fraction=frac)
            if pass_name == "int8":
                build_int8(model, src, tmp)
            else:
                build_dtype(src, tmp, DTYPES.get(pass_name, source_dtype))
            report(stage="evaluating", message=f"{pass_name}: quality gate", fraction=frac + 0.45 / len(passes))
            candidate = load_candidate(pass_name, tmp, source_dtype)
            numbers, failure = quality.compare(source_scores, quality.score(candidate, chunks), gates[pass_name])
            del candidate
            if failure:
                log.warning("pass %s failed its quality gate: %s", pass_name, failure)
                results.append(PassResult(pass_name, out, False, numbers, failure))
                continue
            write_manifest(tmp, out, source=f"optimizer:{name}", revision=src_manifest.revision, parent=name,
                           passes=[*src_manifest.passes, pass_name], quality=numbers,
                           quantization="int8" if pass_name == "int8" else "",
                           extra={"heldout": text_source})
            if store.find(out) is not None:
                raise OptimizeError(f"model {out!r} appeared while the pass ran")
            os.rename(tmp, store.path(out))
            results.append(PassResult(pass_name, out, True, numbers))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateFailed("quality gate failed: " + "; ".join(f"{r.pass_name}: {r.reason}" for r in failed), results)
    report(stage="ready", message="done: " + ", ".join(r.output for r in results), fraction=1.0)
    return results

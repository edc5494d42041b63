"""What an optimize request means, checked without torch (the model-manager API imports this).

Pass names, output names (``<name>-<pass>``), the int8 config marker, the errors, and
:func:`check_request`, which every entry point runs before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.artifacts import ArtifactStore, validate_name

PASSES = ("safetensors", "bf16", "fp16", "int8")
QUANT_METHOD = "spindle-int8"


class OptimizeError(Exception):
    """A request the optimizer cannot carry out (unknown model or pass, output exists, no space)."""


@dataclass
class PassResult:
    pass_name: str
    output: str
    passed: bool
    quality: dict[str, float]
    reason: str | None = None


class GateFailed(OptimizeError):
    """One or more passes failed their quality gate; ``results`` holds every pass's outcome."""

    def __init__(self, message: str, results: list[PassResult]):
        super().__init__(message)
        self.results = results


def is_quantized_config(config: dict[str, Any]) -> bool:
    q = config.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def output_name(name: str, pass_name: str) -> str:
    return validate_name(f"{name}-{pass_name}")


def check_passes(passes: list[str]) -> None:
    if not passes:
        raise OptimizeError("no passes given: choose from " + ", ".join(PASSES))
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise OptimizeError(f"unknown pass(es) {unknown}: choose from {', '.join(PASSES)}")
    if len(set(passes)) != len(passes):
        raise OptimizeError("a pass is listed twice")


def check_request(store: ArtifactStore, name: str, passes: list[str]) -> tuple[Path, list[str]]:
    """The source directory and the output names, or an OptimizeError saying what is wrong."""
    validate_name(name)
    check_passes(passes)
    src = store.find(name)
    if src is None:
        raise OptimizeError(f"model {name!r} is not in the artifact volume")
    config = json.loads((src / "config.json").read_text())
    if is_quantized_config(config):
        raise OptimizeError(f"model {name!r} is already quantized; optimize its source instead")
    outputs = [output_name(name, p) for p in passes]
    taken = [o for o in outputs if store.find(o) is not None]
    if taken:
        raise OptimizeError(f"output model(s) already exist: {', '.join(taken)} (delete them first)")
    return src, outputs

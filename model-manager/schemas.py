"""Request and response bodies of the model-manager API.

Requests are strict, as documented: `"stream": 0` or `"max_perplexity_ratio": "1.5"` is a 400, not converted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.artifacts import Manifest


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    repo_id: str = Field(min_length=1, max_length=200, description="Hub repo, e.g. HuggingFaceTB/SmolLM2-135M")
    revision: str = Field("main", min_length=1, max_length=255, description="branch, tag or commit")
    name: str | None = Field(None, max_length=128, description="name in the volume (default: the repo's name)")
    stream: bool = Field(False, description="answer with the job's progress as NDJSON until it ends")


class ImportPathRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1, max_length=4096, description="directory or tarball below IMPORT_DIR")
    name: str = Field(min_length=1, max_length=128)
    stream: bool = False


class OptimizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    passes: list[str] = Field(min_length=1, max_length=4, description="of: safetensors, bf16, fp16, int8")
    max_perplexity_ratio: float | None = Field(None, gt=1.0, le=10.0)
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    worker_id: str | None = Field(None, min_length=1, max_length=200,
                                  description="one worker; omitted = every worker decides")


class ModelView(BaseModel):
    id: str
    object: str = "model"
    size_bytes: int
    dtype: str
    quantization: str
    parameter_count: int
    context_length: int
    architecture: str
    source: str
    revision: str
    created: float
    parent: str | None
    passes: list[str]
    quality: dict[str, float]
    bundled: bool
    status: str  # "ready" (in the volume) or "serving" (a live worker advertises it)
    workers: list[str]
    manifest: dict[str, Any] | None = None

    @classmethod
    def of(cls, m: Manifest, bundled: bool, workers: list[str], full: bool = False) -> ModelView:
        return cls(id=m.name, size_bytes=m.size_bytes, dtype=m.dtype, quantization=m.quantization,
                   parameter_count=m.parameter_count, context_length=m.context_length, architecture=m.architecture,
                   source=m.source, revision=m.revision, created=m.created, parent=m.parent, passes=m.passes,
                   quality=m.quality, bundled=bundled, status="serving" if workers else "ready", workers=workers,
                   manifest=m.model_dump() if full else None)

"""The artifact volume: one directory per model, written atomically, described by ``manifest.json``.

Layout::

    <ARTIFACTS_DIR>/
        <name>/                 a servable model: Hugging Face files + our manifest
            manifest.json       ``Manifest`` below
            config.json, generation_config.json
            model.safetensors (or model-0000x-of-0000y.safetensors + index)
            tokenizer.json, tokenizer_config.json, special_tokens_map.json ...
        .tmp/                   work in progress; renamed into place when complete
        .locks/                 (model-manager) per-name locks

A directory without ``manifest.json`` is not a model. Writers build a model in ``.tmp/`` and
``os.rename`` it into place, so a reader never sees half a model. Models shipped with the code
(``BUNDLED_MODELS_DIR``, the offline default) use the same layout and are found after the volume.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
TMP_DIR = ".tmp"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidModelName(ValueError):
    pass


def validate_name(name: str) -> str:
    """A model name is one path component: letters, digits, ``.``, ``_``, ``-``; no ``..``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidModelName(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    v: int = 1
    name: str
    source: str = ""  # e.g. "hf:HuggingFaceTB/SmolLM2-135M-Instruct", "local:/path", "bundled"
    revision: str = ""
    architecture: str = ""
    dtype: str = ""
    parameter_count: int = 0
    context_length: int = 0
    files: list[FileEntry] = Field(default_factory=list)
    created: float = Field(default_factory=time.time)
    parent: str | None = None  # the artifact an optimizer pass started from
    passes: list[str] = Field(default_factory=list)
    quality: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, str] = Field(default_factory=dict)
    # "" = plain weights; "int8" = int8 weight-only (load with optimizer.quant.load_quantized)
    quantization: str = ""

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(model_dir: Path) -> list[FileEntry]:
    """Every regular file under ``model_dir`` except the manifest, with size and sha256."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST:
            out.append(FileEntry(path=p.relative_to(model_dir).as_posix(), size=p.stat().st_size,
                                 sha256=sha256_file(p)))
    return out


def describe_config(model_dir: Path) -> dict:
    """architecture, dtype, context length and parameter count read from config.json + weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or [cfg.get("model_type", "")]
    ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("n_ctx") or 0
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or ""
    return {"architecture": archs[0], "context_length": int(ctx), "dtype": str(dtype),
            "parameter_count": count_parameters(model_dir)}


def count_parameters(model_dir: Path) -> int:
    """Parameters in the safetensors files, read from their headers only."""
    total = 0
    for st in model_dir.glob("*.safetensors"):
        with open(st, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


def write_manifest(model_dir: Path, name: str, **fields) -> Manifest:
    info = describe_config(model_dir)
    info.update(fields)
    # ``files`` may be passed when the caller already hashed them (a pull verifies while downloading).
    files = info.pop("files", None) or file_entries(model_dir)
    manifest = Manifest(name=name, files=files, **info)
    (model_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(model_dir: Path) -> Manifest:
    return Manifest.model_validate_json((model_dir / MANIFEST).read_text())


def verify(model_dir: Path, manifest: Manifest | None = None) -> list[str]:
    """Problems found checking the files against the manifest (empty list = intact)."""
    manifest = manifest or read_manifest(model_dir)
    problems = []
    for entry in manifest.files:
        p = model_dir / entry.path
        if not p.is_file():
            problems.append(f"missing {entry.path}")
        elif p.stat().st_size != entry.size:
            problems.append(f"size mismatch {entry.path}")
        elif sha256_file(p) != entry.sha256:
            problems.append(f"checksum mismatch {entry.path}")
    return problems


class ArtifactStore:
    """Finds models by name in the artifact volume, then among the bundled models."""

    def __init__(self, artifacts_dir: Path, bundled_dir: Path | None = None):
        self.root = Path(artifacts_dir)
        self.bundled = Path(bundled_dir) if bundled_dir else None

    def _roots(self) -> list[Path]:
        return [r for r in (self.root, self.bundled) if r is not None]

    def path(self, name: str) -> Path:
        """Where a model called ``name`` lives (or would live) in the volume."""
        return self.root / validate_name(name)

    def find(self, name: str) -> Path | None:
        validate_name(name)
        for root in self._roots():
            d = root / name
            if (d / MANIFEST).is_file():
                return d
        return None

    def manifest(self, name: str) -> Manifest | None:
        d = self.find(name)
        return read_manifest(d) if d else None

    def list(self) -> list[Manifest]:
        seen: dict[str, Manifest] = {}
        for root in self._roots():
            if not root.is_dir():
                continue
            for d in sorted(root.iterdir()):
                if d.name.startswith(".") or d.name in seen or not (d / MANIFEST).is_file():
                    continue
                try:
                    seen[d.name] = read_manifest(d)
                except ValueError:
                    continue
        return list(seen.values())

    def is_bundled(self, name: str) -> bool:
        d = self.find(name)
        return bool(d and self.bundled and d.parent == self.bundled)

    def tmp_dir(self) -> Path:
        t = self.root / TMP_DIR
        t.mkdir(parents=True, exist_ok=True)
        return t

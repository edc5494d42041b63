"""Checks every new model passes, and the one way a model enters the volume.

A job builds a model in ``<volume>/.tmp/<something>/``; :func:`check_model_dir` decides whether it is a
causal LM we can serve (config, tokenizer, safetensors weights; pickled weights only with
ALLOW_PICKLE_WEIGHTS; no links); :func:`install` writes ``manifest.json`` and renames the directory
into place, so a reader sees either no model or a whole one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from protocol.artifacts import MANIFEST, ArtifactStore, FileEntry, Manifest, write_manifest

CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Names the REST routes use next to /models/{name}; a model with one of them could not be addressed.
RESERVED_NAMES = frozenset({"search", "jobs", "pull", "import"})
MAX_SAFETENSORS_HEADER = 100 * 1024**2


class InstallError(Exception):
    """The candidate is not a servable model, or there is no room for it; the message says why."""


def check_name_free(store: ArtifactStore, name: str) -> None:
    if name in RESERVED_NAMES:
        raise InstallError(f"'{name}' is a reserved name; choose another")
    if store.find(name) is not None:
        raise InstallError(f"a model named '{name}' already exists (delete it first)")


def is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


def check_model_dir(root: Path, allow_pickle: bool) -> list[str]:
    """Raise InstallError unless ``root`` is a servable causal LM; returns notes (files dropped)."""
    notes: list[str] = []
    for p in root.rglob("*"):
        if p.is_symlink():
            raise InstallError(f"symbolic links are not allowed in a model: {p.relative_to(root)}")
        if not (p.is_file() or p.is_dir()):
            raise InstallError(f"special files are not allowed in a model: {p.relative_to(root)}")
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise InstallError("not a transformers model: no config.json at the top level")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InstallError(f"config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not (cfg.get("architectures") or cfg.get("model_type")):
        raise InstallError("config.json names no architecture (architectures / model_type)")
    if not any((root / t).is_file() for t in TOKENIZER_FILES):
        raise InstallError("no tokenizer: expected one of " + ", ".join(TOKENIZER_FILES))
    safetensors = list(root.glob("*.safetensors"))
    pickles = [p for p in root.rglob("*") if p.is_file() and is_pickle(p.name)]
    if safetensors and pickles:
        for p in pickles:  # the safetensors are what we load; pickles are dead weight and a hazard
            p.unlink()
            notes.append(f"dropped pickled file {p.relative_to(root)} (safetensors present)")
    elif pickles and not allow_pickle:
        raise InstallError("the model has only pickled weights (" + ", ".join(p.name for p in pickles[:3]) +
                           "); loading a pickle can run arbitrary code, so it is refused. Convert it to "
                           "safetensors, or set ALLOW_PICKLE_WEIGHTS=true if you trust the source")
    elif not safetensors and not pickles:
        raise InstallError("no model weights: expected *.safetensors files at the top level")
    for st in safetensors:
        check_safetensors(st)
    return notes


def check_safetensors(path: Path) -> None:
    """The header is sane JSON and every tensor's bytes lie inside the file (no data is loaded)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        body = size - 8 - n
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            if not (0 <= start <= end <= body) or not isinstance(meta["shape"], list):
                raise ValueError(f"tensor {key!r} lies outside the file")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InstallError(f"{path.name} is not a valid safetensors file: {e}") from None


def check_disk_space(path: Path, need: int, reserve: int) -> None:
    """Raise InstallError unless ``need`` bytes fit on ``path``'s file system with ``reserve`` to spare."""
    free = shutil.disk_usage(path).free
    if free - need < reserve:
        raise InstallError(f"not enough disk space on the artifact volume: need {need} bytes and a reserve "
                           f"of {reserve} (MIN_FREE_DISK_BYTES), {free} free")


def _make_readable(root: Path) -> None:
    """Workers mount the volume read-only, maybe as another user: files 0644, directories 0755."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def install(store: ArtifactStore, tmp: Path, name: str, *, files: list[FileEntry] | None = None,
            **fields: object) -> Manifest:
    """Write the manifest into ``tmp`` and rename it to ``<volume>/<name>`` (atomic on one file system)."""
    manifest = write_manifest(tmp, name, files=files, **fields)
    _make_readable(tmp)
    target = store.path(name)
    if target.exists():
        raise InstallError(f"a model named '{name}' appeared while this job ran")
    os.rename(tmp, target)
    return manifest


def remove_manifest(root: Path) -> None:
    (root / MANIFEST).unlink(missing_ok=True)

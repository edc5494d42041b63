"""protocol.artifacts: names, manifests, verification and the store's view of the volume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protocol.artifacts import (
    MANIFEST,
    ArtifactStore,
    FileEntry,
    InvalidModelName,
    Manifest,
    count_parameters,
    read_manifest,
    validate_name,
    verify,
    write_manifest,
)


def fake_model(root: Path, name: str, hidden: int = 8) -> Path:
    """A directory shaped like a model (config + safetensors + tokenizer file), no transformers needed."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "max_position_embeddings": 256, "dtype": "float32"}))
    save_file({"a.weight": torch.zeros(hidden, 4), "b.bias": torch.zeros(hidden)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize("name", ["tiny", "SmolLM2-135M-Instruct", "a.b_c-d", "m" * 128, "0abc"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "/abs", ".hidden", "-x", "a..b", "x" * 129, "a b",
                                  "a\\b", "a\x00b", "é", "a:b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_name(name)


def test_manifest_describes_and_verifies(tmp_path: Path) -> None:
    d = fake_model(tmp_path, "m")
    m = write_manifest(d, "m", source="test")
    assert (m.architecture, m.context_length, m.dtype) == ("LlamaForCausalLM", 256, "float32")
    assert m.parameter_count == count_parameters(d) == 8 * 4 + 8
    assert {f.path for f in m.files} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert m.size_bytes == sum(p.stat().st_size for p in d.iterdir() if p.name != MANIFEST)
    assert read_manifest(d) == m
    assert verify(d) == []

    (d / "tokenizer.json").write_text("{ }")  # size changes
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # same size, new bytes
    (d / "config.json").unlink()
    assert sorted(verify(d)) == ["checksum mismatch model.safetensors", "missing config.json",
                                 "size mismatch tokenizer.json"]


def test_write_manifest_uses_given_files_and_new_fields(tmp_path: Path) -> None:
    d = fake_model(tmp_path, "m")
    given = [FileEntry(path="model.safetensors", size=1, sha256="ab")]
    write_manifest(d, "m", files=given, quantization="int8", parent="src", passes=["int8"],
                       quality={"top1_agreement": 0.99})
    again = Manifest.model_validate_json((d / MANIFEST).read_text())
    assert again.files == given and again.quantization == "int8" and again.parent == "src"
    assert Manifest(name="x").quantization == ""  # old manifests read as unquantized


def test_store_lists_finds_and_prefers_the_volume(tmp_path: Path) -> None:
    volume, bundled = tmp_path / "vol", tmp_path / "bundled"
    for root, name in ((volume, "a"), (bundled, "a"), (bundled, "b")):
        write_manifest(fake_model(root, name), name, source=str(root.name))
    fake_model(volume, "no-manifest")
    broken = fake_model(volume, "broken")
    (broken / MANIFEST).write_text("{not json")
    (volume / ".tmp" / "pull-x").mkdir(parents=True)
    store = ArtifactStore(volume, bundled)

    assert sorted(m.name for m in store.list()) == ["a", "b"]
    assert store.find("a") == volume / "a" and store.manifest("a").source == "vol"
    assert store.find("b") == bundled / "b" and store.is_bundled("b") and not store.is_bundled("a")
    assert store.find("no-manifest") is None and store.find("missing") is None
    assert store.path("new") == volume / "new"
    assert store.tmp_dir() == volume / ".tmp"
    for bad in ("../a", ".tmp", "a/b"):
        with pytest.raises(InvalidModelName):
            store.find(bad)
        with pytest.raises(InvalidModelName):
            store.path(bad)

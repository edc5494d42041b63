"""What may enter the artifact volume: archive safety, import paths, the servable-model check, disk space."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from model_manager.importer import ImportRefused, check_tar, resolve_local
from model_manager.install import InstallError, check_disk_space, check_model_dir, check_name_free
from model_manager.pull import PullError, RemoteFile, select_files, validate_repo_id, validate_revision
from protocol.artifacts import ArtifactStore
from tests.unit.test_artifacts import fake_model


def tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_a_plain_archive_passes(tmp_path: Path) -> None:
    t = tarball(tmp_path / "ok.tar.gz", [(member("m/config.json"), b"{}"), (member("m/model.safetensors"), b"x" * 10)])
    assert check_tar(t, 1000) == 12


@pytest.mark.parametrize("bad, why", [
    (member("/etc/passwd"), "absolute"),
    (member("../evil"), "traversal"),
    (member("m/../../evil"), "traversal"),
    (member("m/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (member("m/hard", tarfile.LNKTYPE, "m/config.json"), "link"),
    (member("m/fifo", tarfile.FIFOTYPE), "special"),
    (member("m/dev", tarfile.CHRTYPE), "special"),
])
def test_unsafe_archive_members_are_refused(tmp_path: Path, bad: tarfile.TarInfo, why: str) -> None:
    data = b"x" if bad.type == tarfile.REGTYPE else None
    t = tarball(tmp_path / "bad.tar.gz", [(member("m/config.json"), b"{}"), (bad, data)])
    with pytest.raises(ImportRefused, match=why):
        check_tar(t, 1000)


def test_oversized_empty_and_garbage_archives_are_refused(tmp_path: Path) -> None:
    big = tarball(tmp_path / "big.tar.gz", [(member("m/model.safetensors"), b"\0" * 5000)])
    with pytest.raises(ImportRefused, match="more than 1000 bytes"):
        check_tar(big, 1000)
    with pytest.raises(ImportRefused, match="empty"):
        check_tar(tarball(tmp_path / "empty.tar.gz", []), 1000)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(ImportRefused, match="not a readable tar"):
        check_tar(junk, 10_000)


def test_import_paths_stay_below_import_dir(tmp_path: Path) -> None:
    root = tmp_path / "imports"
    (root / "model").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert resolve_local(root, "model") == (root / "model").resolve()
    assert resolve_local(root, str(root / "model")) == (root / "model").resolve()
    for bad in ("../outside", "/etc", "escape", "model/../../outside", "missing", "", "a\x00b"):
        with pytest.raises(ImportRefused):
            resolve_local(root, bad)


def test_servable_model_check(tmp_path: Path) -> None:
    good = fake_model(tmp_path, "good")
    assert check_model_dir(good, allow_pickle=False) == []

    both = fake_model(tmp_path, "both")
    (both / "pytorch_model.bin").write_bytes(b"pickle")
    assert check_model_dir(both, allow_pickle=False) == ["dropped pickled file pytorch_model.bin (safetensors present)"]
    assert not (both / "pytorch_model.bin").exists()

    pickled = fake_model(tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(InstallError, match="pickle"):
        check_model_dir(pickled, allow_pickle=False)

    linked = fake_model(tmp_path, "linked")
    (linked / "extra.json").symlink_to("/etc/hostname")
    with pytest.raises(InstallError, match="symbolic links"):
        check_model_dir(linked, allow_pickle=False)

    no_tok = fake_model(tmp_path, "no-tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(InstallError, match="tokenizer"):
        check_model_dir(no_tok, allow_pickle=False)

    damaged = fake_model(tmp_path, "damaged")
    (damaged / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InstallError, match="not a valid safetensors"):
        check_model_dir(damaged, allow_pickle=False)


def test_names_and_disk_space(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    fake_model(tmp_path, "taken")
    (tmp_path / "taken" / "manifest.json").write_text('{"name": "taken"}')
    check_name_free(store, "free")
    for name, why in (("taken", "already exists"), ("search", "reserved"), ("jobs", "reserved")):
        with pytest.raises(InstallError, match=why):
            check_name_free(store, name)
    check_disk_space(tmp_path, 1, 0)
    with pytest.raises(InstallError, match="not enough disk space"):
        check_disk_space(tmp_path, 1, 1 << 60)


def _files(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 1, "0" * 40, None) for p in paths]


def test_pull_takes_only_what_a_causal_lm_needs() -> None:
    repo = _files("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin", "README.md",
                  ".gitattributes", "onnx/model.onnx", "original/params.json")
    picked = [f.path for f in select_files(repo, allow_pickle=False)]
    assert picked == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                      "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                      "tokenizer_config.json"]
    only_bin = _files("config.json", "tokenizer.json", "pytorch_model.bin")
    with pytest.raises(PullError, match="ALLOW_PICKLE_WEIGHTS"):
        select_files(only_bin, allow_pickle=False)
    assert [f.path for f in select_files(only_bin, allow_pickle=True)] == ["config.json", "pytorch_model.bin",
                                                                             "tokenizer.json"]
    with pytest.raises(PullError, match=r"config\.json"):
        select_files(_files("model.safetensors"), allow_pickle=False)


@pytest.mark.parametrize("repo_id", ["../../etc", "a/b/c", "/abs", "a/..", "", "a b/c", "x" * 300])
def test_bad_repo_ids(repo_id: str) -> None:
    with pytest.raises(PullError):
        validate_repo_id(repo_id)


@pytest.mark.parametrize("rev", ["../x", "a/../b", "", "-x", "a//b", "x" * 300])
def test_bad_revisions(rev: str) -> None:
    with pytest.raises(PullError):
        validate_revision(rev)


def test_good_repo_ids_and_revisions() -> None:
    assert validate_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and validate_repo_id("gpt2")
    assert validate_revision("main") and validate_revision("refs/pr/1") and validate_revision("a" * 40)

"""Import a model from a tarball (uploaded, or a path under IMPORT_DIR) or a directory under IMPORT_DIR.

For air-gapped sites. The same checks as a pull (``install.check_model_dir``), and for archives:
no absolute member names, no ``..``, no symbolic or hard links, no devices or FIFOs, at most
``MAX_MEMBERS`` entries and at most MAX_UPLOAD_BYTES unpacked. The model may sit at the archive's top
level or inside one top-level directory.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

from model_manager.install import InstallError, check_disk_space, check_model_dir, install
from model_manager.progress import Progress
from protocol.artifacts import ArtifactStore, Manifest

MAX_MEMBERS = 10_000


class ImportRefused(InstallError):
    """The archive or path is unsafe or not a model; the message says why (a 4xx at the API)."""


def check_tar(path: Path, max_total: int) -> int:
    """Raise ImportRefused for an unsafe archive; returns the unpacked size in bytes."""
    total = 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for count, m in enumerate(tf, 1):
                name = m.name
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                    raise ImportRefused(f"archive member has an absolute path: {name!r}")
                if ".." in parts or "\\" in name:
                    raise ImportRefused(f"archive member escapes the archive (path traversal): {name!r}")
                if m.issym() or m.islnk():
                    raise ImportRefused(f"archive member is a link, which is not allowed: {name!r}")
                if not (m.isfile() or m.isdir()):
                    raise ImportRefused(f"archive member is a special file, which is not allowed: {name!r}")
                total += m.size
                if total > max_total:
                    raise ImportRefused(f"archive unpacks to more than {max_total} bytes (MAX_UPLOAD_BYTES)")
                if count > MAX_MEMBERS:
                    raise ImportRefused(f"archive has more than {MAX_MEMBERS} entries")
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise ImportRefused(f"not a readable tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz): {e}") from None
    if total == 0:
        raise ImportRefused("the archive is empty")
    return total


def resolve_local(import_dir: Path, path: str) -> Path:
    """``path`` (relative to IMPORT_DIR, or absolute inside it) resolved, or ImportRefused."""
    if not path or "\x00" in path:
        raise ImportRefused("path is empty")
    root = import_dir.resolve()
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise ImportRefused(f"path {path!r} is outside IMPORT_DIR ({import_dir}); only paths below it can be "
                            "imported (or upload a tarball)")
    try:
        exists, usable = target.exists(), target.is_dir() or target.is_file()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise ImportRefused(f"path {path!r} cannot be read: {e.strerror}") from None
    if not exists:
        raise ImportRefused(f"path {path!r} does not exist under IMPORT_DIR")
    if not usable:
        raise ImportRefused(f"path {path!r} is neither a directory nor a tarball")
    return target


def _dir_size(src: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                raise ImportRefused(f"symbolic links are not allowed: {p.relative_to(src)}")
        total += sum((Path(dirpath) / n).stat().st_size for n in filenames)
    return total


def _model_root(work: Path) -> Path:
    if (work / "config.json").is_file():
        return work
    entries = [p for p in work.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise ImportRefused("no config.json at the top of the archive or of its single top-level directory")


def import_model(store: ArtifactStore, *, name: str, source: Path, label: str, allow_pickle: bool,
                 max_bytes: int, min_free_bytes: int, progress: Progress) -> Manifest:
    """Unpack or copy ``source`` into ``.tmp``, check it, install it as ``name``."""
    work = store.tmp_dir() / f"import-{name}-{uuid.uuid4().hex[:8]}"
    try:
        if source.is_dir():
            size = _dir_size(source)
            check_disk_space(store.tmp_dir(), size, min_free_bytes)
            progress.update(stage="extracting", bytes_total=size, message=f"copying {label}")
            shutil.copytree(source, work, symlinks=True)
        else:
            size = check_tar(source, max_bytes)
            check_disk_space(store.tmp_dir(), size, min_free_bytes)
            progress.update(stage="extracting", bytes_total=size, message=f"unpacking {label}")
            work.mkdir()
            with tarfile.open(source, "r:*") as tf:
                tf.extractall(work, filter="data")
        progress.update(bytes_done=size, stage="verifying", message="checking the model")
        root = _model_root(work)
        notes = check_model_dir(root, allow_pickle)
        if notes:
            progress.update(message="; ".join(notes))
        manifest = install(store, root, name, source=f"import:{label}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest

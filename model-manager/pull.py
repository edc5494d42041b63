"""Download a causal LM from the Hugging Face Hub (or HF_ENDPOINT) into the artifact volume.

1. Resolve the revision to a commit and list the repo's top-level files (``HfApi.model_info`` and
   ``HfApi.list_repo_tree``: sizes, git blob ids and, for LFS files, sha256).
2. Keep only what a causal LM needs: config, generation config, tokenizer files, safetensors weights
   (+ index). Pickled ``.bin`` weights only when the repo has no safetensors and
   ALLOW_PICKLE_WEIGHTS is set.
3. Check the disk, then download each file into
   ``<volume>/.tmp/pull-<name>/<file>.part`` (the URL and auth headers from huggingface_hub). A dropped
   connection is retried with an HTTP Range request for the missing bytes only; a crashed worker's
   ``.part`` files stay, and the next pull of the same name and commit resumes them the same way.
4. Verify each file against the Hub's checksum (sha256 for LFS files, the git blob sha1 otherwise);
   a mismatch deletes the whole working directory and fails the job: nothing half-written remains.
5. Write ``manifest.json`` and rename the directory into the volume (``install.install``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from model_manager.install import InstallError, check_disk_space, check_model_dir, install, is_pickle
from model_manager.progress import Progress
from protocol.artifacts import ArtifactStore, FileEntry, Manifest

log = logging.getLogger(__name__)

REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
NEEDED = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
})
STATE_FILE = ".pull.json"
RETRIES = 5
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class PullError(Exception):
    """A pull that cannot succeed as asked; the message is meant for the user."""


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id:
        raise PullError(f"invalid repo_id {repo_id!r}: expected 'owner/name' (letters, digits, '.', '_', '-')")
    return repo_id


def validate_revision(revision: str) -> str:
    if not REVISION_RE.match(revision or "") or ".." in revision or "//" in revision:
        raise PullError(f"invalid revision {revision!r}")
    return revision


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # LFS files only


def select_files(files: list[RemoteFile], allow_pickle: bool) -> list[RemoteFile]:
    """The files a causal LM needs, from the repo's top level (raises PullError when unusable)."""
    top = {f.path: f for f in files if "/" not in f.path}
    if "config.json" not in top:
        raise PullError("not a transformers model: the repo has no config.json")
    weights = [f for p, f in top.items() if p.endswith(".safetensors")]
    named = [f for f in weights if not f.path.startswith("consolidated")]
    weights = named or weights
    if weights:
        if "model.safetensors.index.json" in top:
            weights.append(top["model.safetensors.index.json"])
    else:
        pickles = [f for p, f in top.items() if is_pickle(p) and p.startswith("pytorch_model")]
        if not pickles:
            raise PullError("the repo has no model weights (no *.safetensors files)")
        if not allow_pickle:
            raise PullError("the repo has only pickled PyTorch weights (pytorch_model*.bin); loading a pickle can "
                            "run arbitrary code, so it is refused. Choose a repo with safetensors, or set "
                            "ALLOW_PICKLE_WEIGHTS=true if you trust this one")
        weights = pickles + [top[p] for p in ("pytorch_model.bin.index.json",) if p in top]
    return sorted([f for p, f in top.items() if p in NEEDED] + weights, key=lambda f: f.path)


def _network_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests")


def hub_error(e: BaseException, endpoint: str, repo_id: str) -> PullError:
    """A one-line, actionable message for whatever the Hub client raised."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.GatedRepoError):
        return PullError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(e, hf.RevisionNotFoundError):
        return PullError(f"revision not found in {repo_id}")
    if isinstance(e, hf.RepositoryNotFoundError):
        return PullError(f"repository {repo_id} not found on {endpoint} (if it is private, set HF_TOKEN)")
    if isinstance(e, hf.OfflineModeIsEnabled):
        return PullError("HF_HUB_OFFLINE is set: downloads are disabled")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return PullError(f"the Hub at {endpoint} answered HTTP {status}: {str(e).splitlines()[0][:200]}")
    if _network_error(e):
        return PullError(f"cannot reach the Hugging Face Hub at {endpoint}: {type(e).__name__}: {e}".strip())
    return PullError(f"unexpected error talking to the Hub: {type(e).__name__}: {e}")


class Hub:
    """The few Hub calls a pull makes, with errors turned into PullError."""

    def __init__(self, endpoint: str = "", token: str = ""):
        from huggingface_hub import HfApi, constants

        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token or None
        self.api = HfApi(endpoint=self.endpoint, token=self.token)

    def resolve(self, repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
        """(commit sha, top-level files)."""
        try:
            info = self.api.model_info(repo_id, revision=revision)
            sha = info.sha or revision
            entries = self.api.list_repo_tree(repo_id, revision=sha, recursive=False)
            files = [RemoteFile(e.path, int(e.size), e.blob_id, e.lfs.sha256 if e.lfs else None)
                     for e in entries if hasattr(e, "blob_id")]
        except Exception as e:
            raise hub_error(e, self.endpoint, repo_id) from None
        return sha, files

    def download(self, repo_id: str, sha: str, f: RemoteFile, out: BinaryIO, resume_size: int) -> None:
        """Append ``f`` to ``out`` (which holds its first ``resume_size`` bytes), resuming after cuts.

        A dropped connection or a 5xx is retried up to ``RETRIES`` times in a row with backoff, each
        retry asking only for the missing bytes (``Range: bytes=<have>-``); any progress resets the count.
        """
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(repo_id, f.path, revision=sha, endpoint=self.endpoint)
        # identity: byte ranges and sizes refer to the file itself, never to a compressed stream
        base = {**build_hf_headers(token=self.token, library_name="spindle"), "Accept-Encoding": "identity"}
        have, failures = resume_size, 0
        while have < f.size:
            headers = {**base, "Range": f"bytes={have}-"} if have else base
            try:
                with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT) as r:
                    if r.status_code >= 500:
                        raise httpx.RemoteProtocolError(f"HTTP {r.status_code}")
                    if r.status_code >= 400:
                        raise PullError(_status_message(r.status_code, f.path, repo_id, self.endpoint))
                    if have and r.status_code == 200:  # the server ignored Range: start over
                        out.seek(0)
                        out.truncate(0)
                        have = 0
                    for chunk in r.iter_raw():
                        out.write(chunk)
                        have += len(chunk)
                        failures = 0
                        if have > f.size:
                            raise PullError(f"{f.path} is larger than the {f.size} bytes the Hub announced")
            except httpx.TransportError as e:
                failures += 1
                if failures > RETRIES:
                    raise PullError(f"download of {f.path} from {self.endpoint} failed {failures} times in a row; "
                                    f"pull again to resume: {type(e).__name__}: {e}") from None
                log.warning("download of %s cut at %d/%d bytes (%s); resuming", f.path, have, f.size, e)
                time.sleep(min(0.5 * 2 ** (failures - 1), 8.0))


def _status_message(status: int, path: str, repo_id: str, endpoint: str) -> str:
    if status in (401, 403):
        return f"not allowed to download {path} from {repo_id}: the repo is gated or private (set HF_TOKEN)"
    if status == 404:
        return f"{path} is missing from {repo_id} on {endpoint}"
    return f"the Hub answered HTTP {status} for {path}"


class _CountingFile:
    """The file http_get writes to, reporting each chunk to the job's progress."""

    def __init__(self, f: BinaryIO, progress: Progress):
        self.f = f
        self.progress = progress

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.progress.add_bytes(len(data))
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *args: int) -> int:
        return self.f.seek(*args)

    def truncate(self, size: int) -> int:
        """Called when the server ignored our Range header and the file restarts from byte 0."""
        before = os.fstat(self.f.fileno()).st_size
        after = self.f.truncate(size)
        self.progress.update(bytes_done=self.progress.snapshot()["bytes_done"] - (before - after))
        return after


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, f: RemoteFile) -> str:
    """The file's sha256 when it matches the Hub's checksum; PullError when it does not."""
    size = path.stat().st_size
    if size != f.size:
        raise PullError(f"size mismatch for {f.path}: expected {f.size} bytes, got {size}")
    digest = file_sha256(path)
    if f.sha256:
        if digest != f.sha256:
            raise PullError(f"checksum mismatch for {f.path}: the Hub says sha256 {f.sha256}, the download has "
                            f"{digest}; nothing was installed")
    elif f.blob_id and git_blob_sha1(path) != f.blob_id:
        raise PullError(f"checksum mismatch for {f.path}: git blob id differs from the Hub's {f.blob_id}; "
                        "nothing was installed")
    return digest


def _work_dir(store: ArtifactStore, name: str, repo_id: str, sha: str) -> Path:
    """``.tmp/pull-<name>``, kept across crashes for the same repo and commit, wiped otherwise."""
    work = store.tmp_dir() / f"pull-{name}"
    state = {"repo_id": repo_id, "sha": sha}
    state_file = work / STATE_FILE
    if work.exists():
        try:
            same = json.loads(state_file.read_text()) == state
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    return work


def pull(store: ArtifactStore, *, repo_id: str, revision: str, name: str, hub: Hub, allow_pickle: bool,
         min_free_bytes: int, progress: Progress) -> Manifest:
    validate_repo_id(repo_id)
    validate_revision(revision)
    progress.update(stage="downloading", message=f"resolving {repo_id}@{revision}")
    sha, remote = hub.resolve(repo_id, revision)
    files = select_files(remote, allow_pickle)
    work = _work_dir(store, name, repo_id, sha)
    have = 0
    for f in files:
        done, part = work / f.path, work / (f.path + ".part")
        have += done.stat().st_size if done.is_file() else part.stat().st_size if part.is_file() else 0
    total = sum(f.size for f in files)
    try:
        check_disk_space(store.tmp_dir(), total - have, min_free_bytes)
    except InstallError as e:
        raise PullError(str(e)) from None
    progress.update(bytes_total=total, bytes_done=have, files_total=len(files), files_done=0,
                    message=f"{len(files)} files, {total} bytes" + (f", resuming at {have}" if have else ""))
    entries: list[FileEntry] = []
    try:
        for i, f in enumerate(files):
            done, part = work / f.path, work / (f.path + ".part")
            progress.update(current_file=f.path, files_done=i, stage="downloading")
            if not done.is_file():
                resume = part.stat().st_size if part.is_file() else 0
                if resume > f.size:
                    part.unlink()
                    resume = 0
                with open(part, "r+b" if resume else "wb") as fh:
                    fh.seek(resume)
                    hub.download(repo_id, sha, f, _CountingFile(fh, progress), resume)  # type: ignore[arg-type]
                progress.update(stage="verifying", message=f"verifying {f.path}")
                digest = verify_file(part, f)
                part.rename(done)
            else:
                digest = verify_file(done, f)
            entries.append(FileEntry(path=f.path, size=f.size, sha256=digest))
        progress.update(files_done=len(files), current_file="", stage="verifying", message="checking the model")
        (work / STATE_FILE).unlink()
        check_model_dir(work, allow_pickle)
    except PullError as e:
        if "mismatch" in str(e):  # corrupt data: never keep any of it
            shutil.rmtree(work, ignore_errors=True)
        raise
    except InstallError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise PullError(str(e)) from None
    return install(store, work, name, files=entries, source=f"hf:{repo_id}", revision=sha)


"""A small local stand-in for the Hugging Face Hub, for offline tests of the real download code.

It serves the routes ``huggingface_hub`` uses for models, from repos the test builds in memory:

- ``GET /api/models?search=&pipeline_tag=&limit=``                 (HfApi.list_models)
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}[?blobs=true]`` (HfApi.model_info)
- ``GET /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]``   (HfApi.list_repo_tree)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}`` with ``Range: bytes=N-[M]`` (206), ``ETag``,
  ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files (hf_hub_download, http_get)

Errors carry the Hub's ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) so huggingface_hub raises its usual exceptions. A repo may require a bearer token.

Fault injection, per (repo, file): :meth:`drop_once` (send N bytes, then cut the connection),
:meth:`corrupt` (serve different bytes than the checksums say), :meth:`stall_once` (send N bytes,
then hold the connection open until the returned event is set). ``requests`` logs every request
(method, path, Range header) so tests can see a resumed download ask for the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    pipeline_tag: str = "text-generation"
    token: str | None = None  # required bearer token (a gated/private repo), None = public
    downloads: int = 0
    sha: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha1(usedforsecurity=False)
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + self.files[path])
        self.sha = h.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def entry(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        out: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if self.is_lfs(path):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out


@dataclass
class Fault:
    kind: str  # "drop", "corrupt", "stall"
    after: int = 0
    once: bool = True
    release: threading.Event = field(default_factory=threading.Event)


class HubStandin:
    def __init__(self, rate: float | None = None):
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Fault] = {}
        self.requests: list[dict[str, Any]] = []
        self.rate = rate  # bytes per second for file bodies (None = as fast as possible)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ set-up
    def add_repo(self, repo_id: str, directory: Path | None = None, files: dict[str, bytes] | None = None,
                 **kw: Any) -> Repo:
        content = dict(files or {})
        if directory is not None:
            for p in sorted(Path(directory).rglob("*")):
                if p.is_file():
                    content[p.relative_to(directory).as_posix()] = p.read_bytes()
        repo = Repo(repo_id, content, **kw)
        self.repos[repo_id] = repo
        return repo

    def drop_once(self, repo_id: str, path: str, after: int) -> None:
        self.faults[(repo_id, path)] = Fault("drop", after)

    def corrupt(self, repo_id: str, path: str) -> None:
        self.faults[(repo_id, path)] = Fault("corrupt", once=False)

    def stall_once(self, repo_id: str, path: str, after: int) -> threading.Event:
        fault = Fault("stall", after)
        self.faults[(repo_id, path)] = fault
        return fault.release

    def clear_faults(self) -> None:
        for f in self.faults.values():
            f.release.set()
        self.faults.clear()

    def file_requests(self, path_suffix: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "GET" and r["path"].endswith(path_suffix)]

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandin:
        hub = self

        class Handler(_Handler):
            standin = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.clear_faults()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_fault(self, repo_id: str, path: str) -> Fault | None:
        with self._lock:
            fault = self.faults.get((repo_id, path))
            if fault is not None and fault.once:
                del self.faults[(repo_id, path)]
            return fault


class _Handler(BaseHTTPRequestHandler):
    standin: HubStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send_json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self, repo: Repo) -> bool:
        return repo.token is None or self.headers.get("Authorization", "") == f"Bearer {repo.token}"

    def _split_repo(self, rest: str, marker: str) -> tuple[Repo | None, str]:
        """``<repo_id>/<marker>/<tail>`` -> (repo, tail); the repo id may or may not have a namespace."""
        for repo_id, repo in self.standin.repos.items():
            prefix = f"{repo_id}/{marker}/"
            if rest.startswith(prefix):
                return repo, rest[len(prefix):]
            if marker == "" and rest == repo_id:
                return repo, ""
        return None, rest

    def _revision(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.sha)

    def _log(self) -> None:
        self.standin.requests.append({"method": self.command, "path": urlsplit(self.path).path,
                                      "range": self.headers.get("Range"), "time": time.time()})

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._log()
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        if path == "/api/models":
            return self._list_models(query)
        if path.startswith("/api/models/"):
            return self._model_api(path[len("/api/models/"):], query)
        if "/resolve/" in path:
            return self._resolve(path.lstrip("/"))
        self._error(404, "EntryNotFound", "not found")

    def _list_models(self, query: dict[str, list[str]]) -> None:
        search = (query.get("search") or [""])[0].lower()
        tag = (query.get("pipeline_tag") or [""])[0]
        limit = int((query.get("limit") or ["1000"])[0])
        out = []
        for repo in self.standin.repos.values():
            if search in repo.repo_id.lower() and (not tag or repo.pipeline_tag == tag) and repo.token is None:
                out.append({"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "likes": 0,
                            "downloads": repo.downloads, "pipeline_tag": repo.pipeline_tag, "private": False,
                            "tags": ["transformers", "safetensors", repo.pipeline_tag],
                            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z"})
        self._send_json(out[:limit])

    def _model_api(self, rest: str, query: dict[str, list[str]]) -> None:
        repo, tail = self._split_repo(rest, "revision")
        kind = "revision"
        if repo is None:
            repo, tail = self._split_repo(rest, "tree")
            kind = "tree"
        if repo is None:
            repo, tail = self._split_repo(rest, "")
            kind, tail = "revision", "main"
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._authorized(repo):
            return self._error(401, "GatedRepo", "Access to this model is restricted")
        if kind == "revision":
            if not self._revision(repo, tail):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            blobs = (query.get("blobs") or [""])[0].lower() == "true"
            siblings = []
            for p in sorted(repo.files):
                e = repo.entry(p)
                s: dict[str, Any] = {"rfilename": p}
                if blobs:
                    s.update(size=e["size"], blobId=e["oid"])
                    if "lfs" in e:
                        s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
                siblings.append(s)
            return self._send_json({"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                                    "sha": repo.sha, "private": repo.token is not None, "gated": False,
                                    "pipeline_tag": repo.pipeline_tag, "tags": ["transformers"],
                                    "downloads": repo.downloads, "likes": 0, "siblings": siblings,
                                    "lastModified": "2024-01-01T00:00:00.000Z"})
        rev, _, sub = tail.partition("/")
        if not self._revision(repo, rev):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        recursive = (query.get("recursive") or [""])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, dirs = [], set()
        for p in sorted(repo.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/", 1)[0])
                continue
            entries.append(repo.entry(p))
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(dirs)]
        self._send_json(entries)

    def _resolve(self, rest: str) -> None:
        repo, tail = self._split_repo(rest, "resolve")
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._authorized(repo):
            return self._error(401, "GatedRepo", "Access to this model is restricted")
        rev, _, fpath = tail.partition("/")
        if not self._revision(repo, rev):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if fpath not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found")
        data = repo.files[fpath]
        entry = repo.entry(fpath)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        fault = self.standin._take_fault(repo.repo_id, fpath) if self.command == "GET" else None
        if fault and fault.kind == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else 0
            end = int(b) if b else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault and fault.kind in ("drop", "stall"):
            self._write(body[:fault.after])
            if fault.kind == "stall":
                fault.release.wait(60)
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(body)

    def _write(self, body: bytes) -> None:
        rate = self.standin.rate
        step = 16 * 1024
        for i in range(0, len(body), step):
            try:
                self.wfile.write(body[i:i + step])
            except (BrokenPipeError, ConnectionResetError):
                return
            if rate:
                time.sleep(step / rate)

"""``spindle models ...``: manage models through the model-manager's REST API, Ollama style.

    spindle models pull HuggingFaceTB/SmolLM2-135M-Instruct     download with a progress bar
    spindle models ls                                           what is in the volume, who serves it
    spindle models show NAME                                    one model's manifest
    spindle models rm NAME [--force]                            delete (refused while served)
    spindle models import ./my-model --name mine                a directory or tarball (uploaded)
    spindle models search smollm                                search the Hub
    spindle models optimize NAME --passes bf16,int8             quality-gated copies
    spindle models load NAME / unload NAME [--worker ID]        tell workers
    spindle models jobs [ID]                                    recent jobs, or one job

MANAGER_URL (default http://127.0.0.1:8001) says where the API is; ADMIN_API_KEY is sent as a Bearer
token when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8001"
TARBALL_TYPES = {".tar": "application/x-tar", ".tgz": "application/gzip", ".gz": "application/gzip",
                 ".bz2": "application/x-bzip2", ".xz": "application/x-xz"}
BAR = 30


class CLIError(Exception):
    pass


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=None))


def _check(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            raise CLIError(f"{err['message']} (HTTP {r.status_code}{', ' + err['code'] if err.get('code') else ''})")
        except (ValueError, KeyError, TypeError):
            raise CLIError(f"HTTP {r.status_code}: {r.text[:300]}") from None
    return r.json()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class ProgressBar:
    """One line redrawn in place on a terminal; one line per stage change otherwise."""

    def __init__(self, out: Any = sys.stderr):
        self.out = out
        self.tty = out.isatty()
        self.last_stage = ""
        self.width = 0

    def show(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * BAR) + "." * (BAR - int(frac * BAR))
            text = f"{stage:<11} [{bar}] {frac * 100:5.1f}% {_size(done)}/{_size(total)} {detail}".rstrip()
        else:
            text = f"{stage:<11} {detail}".rstrip()
        if self.tty:
            pad = max(self.width - len(text), 0)
            self.out.write("\r" + text + " " * pad)
            self.width = len(text)
        elif stage != self.last_stage:
            self.out.write(text + "\n")
        self.out.flush()
        self.last_stage = stage

    def end(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()
        self.width = 0


def follow(client: httpx.Client, job: dict[str, Any]) -> int:
    """Show a job's progress from its NDJSON stream until it ends; 0 when ready, 1 when failed."""
    bar = ProgressBar()
    last = job
    with client.stream("GET", f"/models/jobs/{job['id']}/stream") as r:
        if r.status_code >= 400:
            r.read()
            _check(r)
        for line in r.iter_lines():
            if not line:
                continue
            last = json.loads(line)
            if "error" in last and "stage" not in last:
                bar.end()
                raise CLIError(last["error"]["message"])
            detail = last.get("current_file") or last.get("message") or ""
            if last["kind"] == "optimize":
                bar.show(last["stage"], 0, 0, detail)
            else:
                bar.show(last["stage"], last["bytes_done"], last["bytes_total"], detail)
    bar.end()
    if last.get("stage") == "ready":
        names = [m["name"] for m in (last.get("result") or {}).get("models", [])] or last.get("names", [])
        print(f"ready: {', '.join(names)}")
        return 0
    if last.get("stalled"):
        print(f"stalled: {last.get('error')}", file=sys.stderr)
        return 1
    print(f"failed: {last.get('error') or last.get('stage')}", file=sys.stderr)
    return 1


def _started(client: httpx.Client, r: httpx.Response, wait: bool) -> int:
    job = _check(r)
    if r.status_code == 200 and job.get("stage") not in ("ready", "failed"):
        print(f"attached to running job {job['id']}", file=sys.stderr)
    if not wait:
        print(job["id"])
        return 0
    return follow(client, job)


# ---------------------------------------------------------------------------------------------- commands
def cmd_pull(args: argparse.Namespace) -> int:
    body = {"repo_id": args.repo_id, "revision": args.revision}
    if args.name:
        body["name"] = args.name
    with _client(args) as c:
        return _started(c, c.post("/models/pull", json=body), not args.no_wait)


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = _check(c.get("/models"))["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("NAME", "SIZE", "DTYPE", "PARAMS", "STATUS", "WORKERS")]
    for m in data:
        dtype = m["dtype"] + ("+int8" if m["quantization"] == "int8" else "")
        status = m["status"] + (" (bundled)" if m["bundled"] else "")
        rows.append((m["id"], _size(m["size_bytes"]), dtype, f"{m['parameter_count'] / 1e6:.1f}M", status,
                     ",".join(m["workers"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(_check(c.get(f"/models/{args.name}")), indent=2))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = _check(c.delete(f"/models/{args.name}", params={"force": "true"} if args.force else None))
    extra = f" (unloaded from {', '.join(out['unloaded_from'])})" if out.get("unloaded_from") else ""
    print(f"deleted {args.name}{extra}")
    return 0


def _upload_chunks(path: Path, bar: ProgressBar) -> Iterator[bytes]:
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            done += len(chunk)
            bar.show("uploading", done, total)
            yield chunk
    bar.end()


def cmd_import(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.server_path:
            if not args.name:
                raise CLIError("--name is required with --server-path")
            return _started(c, c.post("/models/import", json={"path": args.path, "name": args.name}), not args.no_wait)
        src = Path(args.path).expanduser()
        if not src.exists():
            raise CLIError(f"{src} does not exist")
        name = args.name or src.name.split(".")[0]
        with tempfile.TemporaryDirectory() as tmp:
            if src.is_dir():
                tarball, ctype = Path(tmp) / "model.tar", "application/x-tar"
                with tarfile.open(tarball, "w") as tf:
                    for p in sorted(src.iterdir()):
                        if p.is_symlink():
                            raise CLIError(f"{p} is a symbolic link; copy the real file into the model directory")
                        tf.add(p, arcname=p.name)
            else:
                tarball, ctype = src, TARBALL_TYPES.get(src.suffix, "application/octet-stream")
            r = c.post("/models/import", params={"name": name}, content=_upload_chunks(tarball, ProgressBar()),
                       headers={"Content-Type": ctype, "Content-Length": str(tarball.stat().st_size)})
        return _started(c, r, not args.no_wait)


def cmd_search(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = _check(c.get("/models/search", params={"q": args.query, "limit": args.limit}))["data"]
    for m in data:
        print(f"{m['id']:<60} downloads {m.get('downloads') or 0:>10}  likes {m.get('likes') or 0:>6}")
    if not data:
        print("no text-generation models found", file=sys.stderr)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"passes": [p.strip() for p in args.passes.split(",") if p.strip()]}
    if args.max_perplexity_ratio is not None:
        body["max_perplexity_ratio"] = args.max_perplexity_ratio
    if args.min_top1_agreement is not None:
        body["min_top1_agreement"] = args.min_top1_agreement
    with _client(args) as c:
        return _started(c, c.post(f"/models/{args.name}/optimize", json=body), not args.no_wait)


def cmd_control(args: argparse.Namespace) -> int:
    body = {"worker_id": args.worker} if args.worker else None
    with _client(args) as c:
        out = _check(c.post(f"/models/{args.name}/{args.action}", json=body))
    print(f"{args.action} {args.name}: sent to {out['receivers']} worker(s)"
          + (f" (for {args.worker})" if args.worker else ""))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.id:
            job = _check(c.get(f"/models/jobs/{args.id}"))
            if args.follow:
                return follow(c, job)
            print(json.dumps(job, indent=2))
            return 0
        data = _check(c.get("/models/jobs"))["data"]
    for j in data:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"]))
        pct = f"{100 * j['bytes_done'] / j['bytes_total']:.0f}%" if j["bytes_total"] else ""
        print(f"{j['id']}  {when}  {j['kind']:<8} {','.join(j['names']):<30} {j['stage']:<11} {pct:>4}  "
              f"{j.get('error') or ''}".rstrip())
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CLIError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except httpx.TransportError as e:
            print(f"error: cannot reach the model-manager at {args.url} ({type(e).__name__}); is it running? "
                  "(set MANAGER_URL)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted (the job keeps running on the server; see 'spindle models jobs')", file=sys.stderr)
            return 130

    return wrapped


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="manage models (pull, ls, rm, import, search, optimize ...)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--url", default=os.environ.get("MANAGER_URL", DEFAULT_URL), help="model-manager URL")
    models.add_argument("--admin-key", default=os.environ.get("ADMIN_API_KEY", ""), help="ADMIN_API_KEY")
    sub = models.add_subparsers(dest="models_command", required=True)

    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub")
    p.add_argument("repo_id")
    p.add_argument("--name", help="name in the volume (default: the repo's name)")
    p.add_argument("--revision", default="main")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.set_defaults(func=_run(cmd_pull))

    p = sub.add_parser("ls", help="list models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_ls))

    p = sub.add_parser("show", help="one model's manifest")
    p.add_argument("name")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("rm", help="delete a model")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even while workers serve it (they are told to unload)")
    p.set_defaults(func=_run(cmd_rm))

    p = sub.add_parser("import", help="import a local model directory or tarball")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--server-path", action="store_true", help="PATH is on the server, below its IMPORT_DIR")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=_run(cmd_import))

    p = sub.add_parser("search", help="search the Hub for text-generation models")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_run(cmd_search))

    p = sub.add_parser("optimize", help="make quality-gated bf16/fp16/int8 copies")
    p.add_argument("name")
    p.add_argument("--passes", default="bf16,int8")
    p.add_argument("--max-perplexity-ratio", type=float)
    p.add_argument("--min-top1-agreement", type=float)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=_run(cmd_optimize))

    for action in ("load", "unload"):
        p = sub.add_parser(action, help=f"tell workers to {action} a model")
        p.add_argument("name")
        p.add_argument("--worker", help="one worker id (default: let every worker decide)")
        p.set_defaults(func=_run(cmd_control), action=action)

    p = sub.add_parser("jobs", help="recent jobs, or one job")
    p.add_argument("id", nargs="?")
    p.add_argument("--follow", action="store_true", help="show the job's progress until it ends")
    p.set_defaults(func=_run(cmd_jobs))

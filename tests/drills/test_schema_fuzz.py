"""Drill 6 of docs/reliability.md: schemathesis against both OpenAPI documents, as served by the real apps.

The gateway (with a real worker running the echo engine, so valid requests complete) and the
model-manager (with its rq jobs worker, and a local stand-in for the Hub) run as processes on a real
Redis. Schemathesis reads each service's ``/openapi.json``, generates valid and invalid requests for
every operation and checks each answer: no 5xx, a documented status code and content type, and a
body that matches the documented schema (every error being the OpenAI error object).

Then explicit cases the generator does not reach: an oversized body, deeply nested JSON, invalid
UTF-8, path traversal in every model name, and wrong content types.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from launcher.redis_server import RedisProcess, free_port
from model_manager.app import JSON_BODY_LIMIT
from tests.conftest import REPO
from tests.hub_standin import HubStandin
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.drill

MODEL = "tiny-llama"
MAX_REQUEST_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 256 * 1024
EXAMPLES = 25  # per operation and phase: keeps the drill near a minute on two busy cores
# Invalid requests must be refused with one of these (413 included: a generated body can exceed the limit).
REFUSALS = [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]
STATS: dict[str, Counter[str]] = {"gateway": Counter(), "model-manager": Counter()}
# Tarball uploads (POST /models/import) are bytes like application/octet-stream.
schemathesis.serializer.alias(["application/x-tar", "application/gzip"], "application/octet-stream")


@dataclass
class Stack:
    gateway: str
    manager: str
    root: Path  # everything the services may write lives below it
    artifacts: Path
    manager_artifacts: Path
    logs: Path
    procs: list[subprocess.Popen]

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.iterdir()))


def _spawn(module: str, env: dict[str, str], logs: Path) -> subprocess.Popen:
    with open(logs / f"{module}.log", "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_ready(url: str, procs: list[subprocess.Popen], stack_logs: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"{dead[0].args} exited:\n" + "\n".join(
            p.read_text(errors="replace")[-3000:] for p in stack_logs.iterdir())
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("schema-fuzz")
    artifacts, manager_artifacts, logs = root / "artifacts", root / "manager-artifacts", root / "logs"
    for d in (artifacts, manager_artifacts, logs, root / "imports", root / "bundled"):
        d.mkdir()
    make_tiny_model(artifacts, MODEL, "llama")
    make_tiny_model(manager_artifacts, "fuzz-model", "llama")
    server = RedisProcess(root / "redis").start()
    hub = HubStandin().start()
    gw_port, mm_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_KEYS", "ADMIN_API_KEY")}
    base.update({"REDIS_URL": server.url, "LOG_FORMAT": "text", "LOG_LEVEL": "WARNING", "TORCH_THREADS": "1",
                 "OMP_NUM_THREADS": "1", "BUNDLED_MODELS_DIR": str(root / "bundled"), "DEFAULT_MODEL": MODEL})
    gw_env = {**base, "ARTIFACTS_DIR": str(artifacts), "GATEWAY_PORT": str(gw_port),
              "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES), "DEFAULT_MAX_TOKENS": "8", "REQUEST_TIMEOUT": "20",
              "EVENT_TIMEOUT": "10", "QUEUE_METRICS_INTERVAL": "0"}
    worker_env = {**gw_env, "ENGINE": "echo", "WORKER_MODELS": MODEL, "HEARTBEAT_INTERVAL": "0.5",
                  "MAX_BATCH": "16", "DRAIN_TIMEOUT": "2"}
    mm_env = {**base, "ARTIFACTS_DIR": str(manager_artifacts), "MANAGER_PORT": str(mm_port),
              "IMPORT_DIR": str(root / "imports"), "HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf-home"),
              "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES), "MIN_FREE_DISK_BYTES": "0", "JOB_STALE_SECONDS": "3"}
    procs = [_spawn("worker", worker_env, logs), _spawn("gateway", gw_env, logs),
             _spawn("model_manager", mm_env, logs), _spawn("model_manager.jobs_worker", mm_env, logs)]
    s = Stack(f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{mm_port}", root, artifacts, manager_artifacts,
              logs, procs)
    try:
        _wait_ready(s.gateway + "/ready", procs, logs)
        _wait_ready(s.manager + "/ready", procs, logs)
        yield s
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        hub.stop()
        server.stop()
        print("\ndrill 6 figures:", json.dumps(_figures()))


def _schema(document: dict[str, Any]) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(max_examples=EXAMPLES, modes=list(schemathesis.GenerationMode))
    schema.config.checks.negative_data_rejection.expected_statuses = [str(s) for s in REFUSALS]
    return schema


def _documents() -> dict[str, dict[str, Any]]:
    """Each service's OpenAPI document, built by its app (the same document it serves, which a test checks).

    Loaded at import because schemathesis' lazy ``from_fixture`` loader does not work with pytest 9."""
    from gateway.app import create_app as gateway_app
    from model_manager.app import create_app as manager_app
    from protocol.settings import GatewaySettings, ManagerSettings

    return {"gateway": gateway_app(GatewaySettings()).openapi(),
            "model-manager": manager_app(ManagerSettings()).openapi()}


DOCUMENTS = _documents()
gateway = _schema(DOCUMENTS["gateway"])
manager = _schema(DOCUMENTS["model-manager"])


def test_the_fuzzed_documents_are_the_served_ones(stack: Stack) -> None:
    assert httpx.get(stack.gateway + "/openapi.json").json() == DOCUMENTS["gateway"]
    assert httpx.get(stack.manager + "/openapi.json").json() == DOCUMENTS["model-manager"]


def _run(service: str, base_url: str, case: schemathesis.Case) -> None:
    stats = STATS[service]
    stats["cases"] += 1
    stats[f"op {case.operation.label}"] = 1
    try:
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)
    except Exception:
        stats["failed_checks"] += 1  # a 5xx or a response that differs from the document
        raise
    stats[f"{response.status_code // 100}xx"] += 1
    if (response.headers.get("content-type") or [""])[0].startswith(("text/event-stream", "application/x-ndjson")):
        stats["streamed"] += 1  # no schema to check; status and content type still are


def _figures() -> dict[str, dict[str, int]]:
    out = {}
    for service, stats in STATS.items():
        figures = {k: v for k, v in stats.items() if not k.startswith("op ")}
        out[service] = {"operations": sum(k.startswith("op ") for k in stats), **figures}
    return out


# Derandomized: the same cases every run, so a failure in CI is reproducible and never a fluke of the draw.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@gateway.parametrize()
@FUZZ
def test_gateway_openapi(case: schemathesis.Case, stack: Stack) -> None:
    _run("gateway", stack.gateway, case)


@manager.parametrize()
@FUZZ
def test_model_manager_openapi(case: schemathesis.Case, stack: Stack) -> None:
    _run("model-manager", stack.manager, case)


# ------------------------------------------------------------------------------------------ explicit cases
GATEWAY_BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/generate", "/stream", "/completion"]
TRAVERSALS = ["../../etc/passwd", "..", "../etc", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd",
              "%2e%2e", "/etc/passwd", "..\\..\\etc\\passwd"]


def send(base: str, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
         content_type: str | None = "application/json") -> tuple[int, bytes]:
    """One request exactly as given: http.client leaves ``..`` and percent escapes in the path alone."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Content-Type": content_type} if content_type else {}
    chunked = body is not None and not isinstance(body, bytes)
    try:
        # The server may answer (413) before reading everything: the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_error(status: int, data: bytes, allowed: Iterable[int]) -> dict[str, Any]:
    """A 4xx from ``allowed`` whose body is exactly the OpenAI error object."""
    assert status in set(allowed), (status, data[:300])
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], data[:300]
    return err


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def body_for(route: str, **extra: Any) -> dict[str, Any]:
    if route == "/v1/chat/completions":
        return chat_body(**extra)
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **extra}


@pytest.mark.parametrize("route", GATEWAY_BODY_ROUTES)
def test_gateway_refuses_oversized_nested_and_undecodable_bodies(stack: Stack, route: str) -> None:
    big = json.dumps(body_for(route, prompt="x" * MAX_REQUEST_BYTES)).encode()
    err = assert_error(*send(stack.gateway, "POST", route, big), [413])
    assert err["code"] == "request_too_large"
    chunks = [big[i:i + 8192] for i in range(0, len(big), 8192)]  # no Content-Length: counted while read
    assert_error(*send(stack.gateway, "POST", route, chunks), [413])
    deep = b'{"model": "tiny-llama", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert len(deep) < MAX_REQUEST_BYTES
    assert_error(*send(stack.gateway, "POST", route, deep), [400, 422])
    assert_error(*send(stack.gateway, "POST", route, b'{"model": "tiny-llama", "prompt": "\xff\xfe\xc0"}'), [400])
    assert_error(*send(stack.gateway, "POST", route, b"\xff\xfe" * 10), [400])


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded", None])
def test_gateway_refuses_wrong_content_types(stack: Stack, content_type: str | None) -> None:
    for route in ["/v1/chat/completions", "/v1/completions"]:  # the native routes take JSON-looking text too
        body = json.dumps(body_for(route)).encode()
        assert_error(*send(stack.gateway, "POST", route, body, content_type), [400, 415])
    for route in GATEWAY_BODY_ROUTES:  # a body that is not JSON at all, whatever its type says
        assert_error(*send(stack.gateway, "POST", route, b"model=tiny-llama&prompt=hi", content_type), [400, 415])


def test_manager_refuses_oversized_nested_undecodable_and_mistyped_bodies(stack: Stack) -> None:
    big = json.dumps({"repo_id": "a/b", "name": "x" * JSON_BODY_LIMIT}).encode()
    assert_error(*send(stack.manager, "POST", "/models/pull", big), [413])
    assert_error(*send(stack.manager, "POST", "/models/pull", [big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 [413])
    tar = b"\0" * (MAX_UPLOAD_BYTES + 1)
    assert_error(*send(stack.manager, "POST", "/models/import?name=big", tar, "application/x-tar"), [413])
    deep = b'{"repo_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    for route in ("/models/pull", "/models/import", "/models/fuzz-model/optimize", "/models/fuzz-model/load"):
        assert_error(*send(stack.manager, "POST", route, deep), [400, 422])
        assert_error(*send(stack.manager, "POST", route, b'{"repo_id": "\xff\xfe"}'), [400])
        assert_error(*send(stack.manager, "POST", route, b'{"name": "x"}', "text/plain"), [400, 415])
    assert_error(*send(stack.manager, "POST", "/models/import", b"just text", "text/plain"), [415])
    assert_error(*send(stack.manager, "POST", "/models/import", b"just text", None), [400, 415])
    long_path = json.dumps({"path": "d" * 4000, "name": "long-path"}).encode()
    assert_error(*send(stack.manager, "POST", "/models/import", long_path), [400])  # was a 500 (ENAMETOOLONG)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` (except logs, Redis and scratch space) with size and mtime."""
    skip = {"logs", "redis", "hf-home"}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip or ".tmp" in rel.parts:
            continue
        st = p.lstat()
        out[str(rel)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _tarball(member: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(member)
        info.size = 5
        tf.addfile(info, io.BytesIO(b"owned"))
    return buf.getvalue()


def test_path_traversal_in_model_names_is_refused_and_touches_nothing(stack: Stack) -> None:
    canary = stack.root / "etc" / "passwd"  # where ARTIFACTS_DIR/../etc/passwd would land
    canary.parent.mkdir(exist_ok=True)
    canary.write_text("canary")
    etc_passwd = Path("/etc/passwd").stat() if Path("/etc/passwd").exists() else None
    before = _tree(stack.root)
    gw, mm = stack.gateway, stack.manager
    for name in TRAVERSALS:
        quoted = name.replace("/", "%2f") if "%" not in name else name
        for path in {f"/v1/models/{name}", f"/v1/models/{quoted}"}:
            assert_error(*send(gw, "GET", path), range(400, 500))
        for route in GATEWAY_BODY_ROUTES:
            assert_error(*send(gw, "POST", route, json.dumps(body_for(route, model=name)).encode()),
                         range(400, 500))
        for path in {f"/models/{name}", f"/models/{quoted}"}:
            assert_error(*send(mm, "GET", path), range(400, 500))
            assert_error(*send(mm, "DELETE", path + "?force=true"), range(400, 500))
            for action in ("load", "unload"):
                assert_error(*send(mm, "POST", f"{path}/{action}", b"{}"), range(400, 500))
            assert_error(*send(mm, "POST", f"{path}/optimize", b'{"passes": ["bf16"]}'), range(400, 500))
        assert_error(*send(mm, "POST", "/models/pull", json.dumps({"repo_id": "test/x", "name": name}).encode()),
                     [400])
        assert_error(*send(mm, "POST", "/models/pull", json.dumps({"repo_id": name}).encode()), [400])
        assert_error(*send(mm, "POST", "/models/import", json.dumps({"path": name, "name": "x"}).encode()), [400])
        assert_error(*send(mm, "POST", "/models/import", json.dumps({"path": "m", "name": name}).encode()), [400])
        assert_error(*send(mm, "POST", f"/models/import?name={quoted}", _tarball("config.json"),
                           "application/x-tar"), [400])
        if "%" not in name:  # escapes mean nothing inside a tarball
            assert_error(*send(mm, "POST", "/models/import?name=tar-escape", _tarball(f"{name}/config.json"),
                               "application/x-tar"), [400])
    assert _tree(stack.root) == before
    assert canary.read_text() == "canary"
    if etc_passwd is not None:
        now = Path("/etc/passwd").stat()
        assert (now.st_size, now.st_mtime_ns) == (etc_passwd.st_size, etc_passwd.st_mtime_ns)
    models = {m["id"] for m in httpx.get(mm + "/models").json()["data"]}
    assert models == {"fuzz-model"}

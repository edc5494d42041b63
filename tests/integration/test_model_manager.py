"""The model-manager as it runs: real uvicorn API + real rq jobs worker processes, real Redis, and a
local stand-in for the Hugging Face Hub (tests/hub_standin.py) serving models built by tests/tiny_models.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from launcher.redis_server import RedisProcess, free_port
from protocol import keys
from protocol.artifacts import MANIFEST, read_manifest, verify
from protocol.messages import ControlMessage, WorkerInfo
from tests.conftest import REPO
from tests.hub_standin import HubStandin

ADMIN_KEY = "test-admin-key"
HF_TOKEN = "hf_test_token"
MAX_UPLOAD = 1_000_000


@dataclass
class Stack:
    url: str
    hub: HubStandin
    artifacts: Path
    bundled: Path
    imports: Path
    redis_url: str
    env: dict[str, str]
    logs: Path
    api: subprocess.Popen
    worker: subprocess.Popen
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def start_worker(self) -> subprocess.Popen:
        log = open(self.logs / f"jobs-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (closed by the child)
        self.worker = subprocess.Popen([sys.executable, "-m", "model_manager.jobs_worker"], cwd=REPO,
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self.worker

    def wait_job(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.client.get(f"/models/jobs/{job_id}").json()
            if v["status"] in ("finished", "failed"):
                return v
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not done in {timeout}s: {v}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model directory under another name (the manifest names the copy)."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    (dst / MANIFEST).write_text(m.model_copy(update={"name": dst.name}).model_dump_json(indent=2))
    return dst


def model_files(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.name != MANIFEST}


@pytest.fixture(scope="module")
def stack(redis_server: RedisProcess, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("manager")
    artifacts, bundled, imports, logs = (tmp / d for d in ("artifacts", "bundled", "imports", "logs"))
    for d in (artifacts, bundled, imports, logs):
        d.mkdir()
    copy_model(tiny_artifacts / "tiny-gpt2", bundled / "bundled-gpt2")
    hub = HubStandin().start()
    llama = model_files(tiny_artifacts / "tiny-llama")
    hub.add_repo("test/tiny-llama", files={**llama, "README.md": b"# tiny", ".gitattributes": b"*.bin lfs",
                                           "onnx/model.onnx": b"\0" * 1000, "pytorch_model.bin": b"pickle"})
    for repo in ("test/resume-cut", "test/resume-crash", "test/corrupt"):
        hub.add_repo(repo, files=model_files(tiny_artifacts / "tiny-qwen2"))
    hub.add_repo("test/gated-llama", files=llama, token=HF_TOKEN)
    pickled = {k: v for k, v in llama.items() if k != "model.safetensors"}
    hub.add_repo("test/pickled", files={**pickled, "pytorch_model.bin": b"not really a pickle"})
    hub.add_repo("test/sentiment", files=llama, pipeline_tag="text-classification")
    hub.add_repo("test/auto", files=llama)
    redis.Redis.from_url(redis_server.url).flushall()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "ARTIFACTS_DIR": str(artifacts),
           "BUNDLED_MODELS_DIR": str(bundled), "IMPORT_DIR": str(imports), "HF_ENDPOINT": hub.url,
           "HF_TOKEN": HF_TOKEN, "HF_HOME": str(tmp / "hf-home"), "ADMIN_API_KEY": ADMIN_KEY,
           "MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "MIN_FREE_DISK_BYTES": "0", "JOB_STALE_SECONDS": "3",
           "MANAGER_PORT": str(port), "LOG_FORMAT": "text", "PULL_ON_START": "test/auto",
           "TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    api_log = open(logs / "api.log", "w")  # noqa: SIM115
    api = subprocess.Popen([sys.executable, "-m", "model_manager"], cwd=REPO, env=env, stdout=api_log,
                           stderr=subprocess.STDOUT)
    s = Stack(f"http://127.0.0.1:{port}", hub, artifacts, bundled, imports, redis_server.url, env, logs, api,
              None)  # type: ignore[arg-type]
    s.start_worker()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(s.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and api.poll() is None, s.log_tail()
        time.sleep(0.2)
    yield s
    for p in (s.api, s.worker):
        if p.poll() is None:
            p.send_signal(signal.SIGINT if p is s.worker else signal.SIGTERM)
    for p in (s.api, s.worker):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    hub.stop()


def assert_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---------------------------------------------------------------------------------------------- pull
def test_pull_streams_progress_to_100_percent(stack: Stack) -> None:
    stack.hub.rate = 250_000  # bytes/s, so the stream shows the download moving
    try:
        lines = []
        with stack.client.stream("POST", "/models/pull", json={"repo_id": "test/tiny-llama", "name": "pulled",
                                                                "stream": True}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
    finally:
        stack.hub.rate = None
    assert lines[-1]["stage"] == "ready", lines[-1]
    done = [ln["bytes_done"] for ln in lines]
    assert done == sorted(done), "progress went backwards"
    total = lines[-1]["bytes_total"]
    assert total > 400_000 and lines[-1]["bytes_done"] == total
    assert lines[-1]["files_done"] == lines[-1]["files_total"] == 6
    assert any(ln["stage"] == "downloading" and 0 < ln["bytes_done"] < total for ln in lines), lines

    model = stack.client.get("/models/pulled").json()
    files = {f["path"]: f for f in model["manifest"]["files"]}
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "chat_template.jinja"}  # no README, onnx/, .bin
    repo = stack.hub.repos["test/tiny-llama"]
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(repo.files["model.safetensors"]).hexdigest()
    assert model["source"] == "hf:test/tiny-llama" and model["revision"] == repo.sha
    assert model["architecture"] == "LlamaForCausalLM" and model["parameter_count"] > 0
    assert verify(stack.artifacts / "pulled") == []
    assert not (stack.artifacts / ".tmp" / "pull-pulled").exists()
    listed = {m["id"]: m for m in stack.client.get("/models").json()["data"]}
    assert listed["pulled"]["status"] == "ready" and listed["bundled-gpt2"]["bundled"] is True
    job = stack.client.get(f"/models/jobs/{lines[-1]['id']}").json()
    assert job["status"] == "finished" and job["result"]["models"][0]["name"] == "pulled"


def test_pull_resumes_after_a_dropped_connection(stack: Stack) -> None:
    stack.hub.drop_once("test/resume-cut", "model.safetensors", after=100_000)
    r = stack.client.post("/models/pull", json={"repo_id": "test/resume-cut"})
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["id"])
    assert job["stage"] == "ready", job
    ranges = [q["range"] for q in stack.hub.file_requests("resume-cut/resolve/" + stack.hub.repos[
        "test/resume-cut"].sha + "/model.safetensors")]
    assert ranges == [None, "bytes=100000-"]
    assert verify(stack.artifacts / "resume-cut") == []


def test_pull_resumes_after_the_jobs_worker_is_killed(stack: Stack) -> None:
    release = stack.hub.stall_once("test/resume-crash", "model.safetensors", after=200_000)
    r = stack.client.post("/models/pull", json={"repo_id": "test/resume-crash", "name": "crashed"})
    assert r.status_code == 202, r.text
    first = r.json()["id"]
    part = stack.artifacts / ".tmp" / "pull-crashed" / "model.safetensors.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 150_000):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.05)
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait(10)
    release.set()
    kept = part.stat().st_size
    stack.start_worker()

    again = stack.client.post("/models/pull", json={"repo_id": "test/resume-crash", "name": "crashed"})
    assert again.status_code == 200 and again.json()["id"] == first  # same pull, still attached
    deadline = time.monotonic() + 30  # the dead job stops counting after JOB_STALE_SECONDS (3 s)
    while True:
        again = stack.client.post("/models/pull", json={"repo_id": "test/resume-crash", "name": "crashed"})
        if again.json()["id"] != first:
            break
        assert time.monotonic() < deadline, again.json()
        time.sleep(0.3)
    assert again.status_code == 202
    job = stack.wait_job(again.json()["id"])
    assert job["stage"] == "ready", job
    sha = stack.hub.repos["test/resume-crash"].sha
    ranges = [q["range"] for q in stack.hub.file_requests(f"resume-crash/resolve/{sha}/model.safetensors")]
    assert ranges == [None, f"bytes={kept}-"]
    assert verify(stack.artifacts / "crashed") == []
    assert stack.client.get(f"/models/jobs/{first}").json()["stalled"] is True


def test_checksum_mismatch_leaves_nothing_behind(stack: Stack) -> None:
    stack.hub.corrupt("test/corrupt", "model.safetensors")
    try:
        r = stack.client.post("/models/pull", json={"repo_id": "test/corrupt"})
        job = stack.wait_job(r.json()["id"])
    finally:
        stack.hub.clear_faults()
    assert job["stage"] == "failed" and job["status"] == "failed"
    assert "checksum mismatch for model.safetensors" in job["error"] and "Traceback" not in job["error"]
    assert not (stack.artifacts / "corrupt").exists()
    assert not (stack.artifacts / ".tmp" / "pull-corrupt").exists()
    assert stack.client.get("/models/corrupt").status_code == 404


def test_refusals_and_errors_of_pull_jobs(stack: Stack) -> None:
    r = stack.client.post("/models/pull", json={"repo_id": "test/pickled"})
    job = stack.wait_job(r.json()["id"])
    assert job["stage"] == "failed" and "ALLOW_PICKLE_WEIGHTS" in job["error"]
    r = stack.client.post("/models/pull", json={"repo_id": "test/does-not-exist"})
    job = stack.wait_job(r.json()["id"])
    assert job["stage"] == "failed" and "not found" in job["error"]
    r = stack.client.post("/models/pull", json={"repo_id": "test/gated-llama"})  # HF_TOKEN opens it
    assert stack.wait_job(r.json()["id"])["stage"] == "ready"
    assert not any(p.name.startswith("pull-") for p in (stack.artifacts / ".tmp").iterdir())


def test_pull_on_start_fetches_the_default_model(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while (r := stack.client.get("/models/auto")).status_code != 200:
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.2)
    assert r.json()["source"] == "hf:test/auto"


def test_unreachable_hub_is_a_clear_error() -> None:
    from model_manager.pull import Hub, PullError

    with pytest.raises(PullError, match=r"cannot reach the Hugging Face Hub at http://127\.0\.0\.1:\d+"):
        Hub(f"http://127.0.0.1:{free_port()}").resolve("owner/model", "main")


# ---------------------------------------------------------------------------------------------- search
def test_search_lists_text_generation_models(stack: Stack) -> None:
    r = stack.client.get("/models/search", params={"q": "tiny", "limit": 10})
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in r.json()["data"]]
    assert "test/tiny-llama" in ids and "test/sentiment" not in ids
    assert len(stack.client.get("/models/search", params={"q": "e", "limit": 2}).json()["data"]) == 2
    assert_error(stack.client.get("/models/search"), 400)
    assert_error(stack.client.get("/models/search", params={"q": "x", "limit": 1000}), 400)


# ---------------------------------------------------------------------------------------------- import
def _tar_model(src: Path, top: str | None = "model") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in sorted(src.iterdir()):
            if p.name != MANIFEST:
                tf.add(p, arcname=f"{top}/{p.name}" if top else p.name)
    return buf.getvalue()


def test_import_a_tarball_and_a_directory(stack: Stack, tiny_artifacts: Path) -> None:
    tarball = _tar_model(tiny_artifacts / "tiny-llama")
    r = stack.client.post("/models/import", params={"name": "imported"}, content=tarball,
                          headers={"Content-Type": "application/gzip"})
    assert r.status_code == 202, r.text
    assert stack.wait_job(r.json()["id"])["stage"] == "ready"
    m = read_manifest(stack.artifacts / "imported")
    assert m.source == "import:upload" and verify(stack.artifacts / "imported") == []
    assert not list((stack.artifacts / ".tmp").glob("upload-*"))

    shutil.copytree(tiny_artifacts / "tiny-qwen2", stack.imports / "qwen-dir")
    r = stack.client.post("/models/import", json={"path": "qwen-dir", "name": "imported-dir"})
    assert r.status_code == 202, r.text
    assert stack.wait_job(r.json()["id"])["stage"] == "ready"
    assert read_manifest(stack.artifacts / "imported-dir").architecture == "Qwen2ForCausalLM"
    assert (stack.imports / "qwen-dir").is_dir()  # the source is left alone


def _bad_tar(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        data = b"{}" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- refusals
def test_every_bad_name_and_path_is_refused(stack: Stack) -> None:
    c = stack.client
    pull = lambda body: c.post("/models/pull", json=body)  # noqa: E731
    for body in ({"repo_id": "../../etc/passwd"}, {"repo_id": "a/b/c"}, {"repo_id": "/abs"},
                 {"repo_id": "test/tiny-llama", "name": "../evil"}, {"repo_id": "test/tiny-llama", "name": "a/b"},
                 {"repo_id": "test/tiny-llama", "name": ".hidden"}, {"repo_id": "test/tiny-llama", "name": "x" * 129},
                 {"repo_id": "test/tiny-llama", "name": "search"}, {"repo_id": "test/tiny-llama", "name": "/abs"},
                 {"repo_id": "test/tiny-llama", "revision": "../../x"}, {"repo_id": "test/tiny-llama", "extra": 1},
                 {"repo_id": 5}, {}):
        assert_error(pull(body), 400)
    assert assert_error(pull({"repo_id": "test/tiny-llama", "name": "bundled-gpt2"}), 409)["code"] == "model_exists"
    assert_error(c.post("/models/pull", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_error(c.post("/models/pull", content=b"x" * 2_000_000, headers={"Content-Type": "application/json"}), 413)
    chunks = (b"x" * 65536 for _ in range(40))  # no Content-Length: refused while it streams
    assert_error(c.post("/models/pull", content=chunks, headers={"Content-Type": "application/json"}), 413)

    for path in ("/models/%2e%2e", "/models/..%2F..%2Fetc", "/models/.hidden", "/models/a%00b"):
        assert_error(c.get(path))
        assert_error(c.delete(path))
        assert_error(c.post(path + "/load"))
    assert_error(c.get("/models/nope"), 404)
    assert_error(c.delete("/models/nope"), 404)
    assert_error(c.get("/models/jobs/..%2F..%2Fx"), 404)
    assert_error(c.get("/models/jobs/" + "0" * 32), 404)

    stack.imports.joinpath("escape").symlink_to(stack.artifacts)
    for p in ("/etc", "../artifacts", "escape", "missing", "../../../../etc/passwd"):
        assert_error(c.post("/models/import", json={"path": p, "name": "x1"}), 400)
    assert_error(c.post("/models/import", json={"path": "qwen-dir", "name": "../x"}), 400)
    tar = {"Content-Type": "application/x-tar"}
    for bad in (_bad_tar("../evil"), _bad_tar("/etc/evil"), _bad_tar("m/link", tarfile.SYMTYPE, "/etc/passwd"),
                _bad_tar("m/hard", tarfile.LNKTYPE, "m/x"), b"not a tarball at all" * 100):
        assert_error(c.post("/models/import", params={"name": "x2"}, content=bad, headers=tar), 400)
    assert_error(c.post("/models/import", params={"name": "x3"}, content=b"\0" * (MAX_UPLOAD + 1), headers=tar), 413)
    assert_error(c.post("/models/import", content=_bad_tar("m/config.json"), headers=tar), 400)  # no name
    assert_error(c.post("/models/import", params={"name": "../x"}, content=_bad_tar("m/a"), headers=tar), 400)
    assert_error(c.post("/models/import", params={"name": "x4"}, content=b"hi",
                        headers={"Content-Type": "text/plain"}), 415)
    assert not list((stack.artifacts / ".tmp").glob("upload-*"))

    assert_error(c.post("/models/bundled-gpt2/optimize", json={"passes": ["nope"]}), 400)
    assert_error(c.post("/models/bundled-gpt2/optimize", json={"passes": []}), 400)
    assert_error(c.post("/models/bundled-gpt2/optimize", json={"passes": ["int8", "int8"]}), 400)
    assert_error(c.post("/models/missing/optimize", json={"passes": ["int8"]}), 404)
    assert_error(c.post("/models/bundled-gpt2/optimize", json={"passes": ["int8"], "min_top1_agreement": 2}), 400)
    assert stack.api.poll() is None


def test_admin_key_guards_mutations_only(stack: Stack) -> None:
    anon = httpx.Client(base_url=stack.url, timeout=10)
    for method, path in (("POST", "/models/pull"), ("POST", "/models/import"), ("DELETE", "/models/pulled"),
                         ("POST", "/models/pulled/optimize"), ("POST", "/models/pulled/load"),
                         ("POST", "/models/pulled/unload")):
        assert assert_error(anon.request(method, path, json={}), 401)["code"] == "invalid_api_key"
        r = anon.request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401)
    for path in ("/health", "/ready", "/status", "/metrics", "/models", "/models/bundled-gpt2", "/models/jobs"):
        assert anon.get(path).status_code == 200, path


# ---------------------------------------------------------------------------------------------- delete
def test_delete_is_refused_while_a_worker_serves_the_model(stack: Stack, tiny_artifacts: Path) -> None:
    copy_model(tiny_artifacts / "tiny-llama", stack.artifacts / "served")
    info = WorkerInfo(worker_id="wk-test", models=["served"], device="cpu", dtype="float32", engine="simple",
                      max_batch=4)
    r = stack.redis
    r.set(keys.worker_key("wk-test"), info.model_dump_json(), ex=30)
    try:
        listed = {m["id"]: m for m in stack.client.get("/models").json()["data"]}
        assert listed["served"]["status"] == "serving" and listed["served"]["workers"] == ["wk-test"]
        err = assert_error(stack.client.delete("/models/served"), 409)
        assert err["code"] == "model_in_use" and "wk-test" in err["message"]
        assert (stack.artifacts / "served").is_dir()
        sub = r.pubsub()
        sub.subscribe(keys.CONTROL_CHANNEL)
        sub.get_message(timeout=1)
        gone = stack.client.delete("/models/served", params={"force": "true"})
        assert gone.status_code == 200 and gone.json()["unloaded_from"] == ["wk-test"]
        msg = ControlMessage.decode(sub.get_message(timeout=5)["data"])
        assert (msg.action, msg.model, msg.worker_id) == ("unload", "served", None)
        sub.close()
    finally:
        r.delete(keys.worker_key("wk-test"))
    assert not (stack.artifacts / "served").exists() and stack.client.get("/models/served").status_code == 404
    assert assert_error(stack.client.delete("/models/bundled-gpt2"), 403)["code"] == "model_bundled"


def test_load_and_unload_publish_control_messages(stack: Stack) -> None:
    sub = stack.redis.pubsub()
    sub.subscribe(keys.CONTROL_CHANNEL)
    sub.get_message(timeout=1)
    r = stack.client.post("/models/bundled-gpt2/load", json={"worker_id": "wk-1"})
    assert r.status_code == 202 and r.json()["receivers"] == 1
    msg = ControlMessage.decode(sub.get_message(timeout=5)["data"])
    assert (msg.action, msg.model, msg.worker_id) == ("load", "bundled-gpt2", "wk-1")
    assert stack.client.post("/models/bundled-gpt2/unload").status_code == 202
    msg = ControlMessage.decode(sub.get_message(timeout=5)["data"])
    assert (msg.action, msg.model, msg.worker_id) == ("unload", "bundled-gpt2", None)
    assert_error(stack.client.post("/models/missing/load"), 404)
    sub.close()


# ---------------------------------------------------------------------------------------------- optimize
def test_optimize_through_the_api_passes_gates_or_leaves_nothing(stack: Stack, tiny_artifacts: Path) -> None:
    copy_model(tiny_artifacts / "tiny-llama", stack.artifacts / "opt")
    r = stack.client.post("/models/opt/optimize", json={"passes": ["bf16", "int8"]})
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["id"], timeout=120)
    assert job["stage"] == "ready", (job, stack.log_tail())
    for name, quant, dtype in (("opt-bf16", "", "bfloat16"), ("opt-int8", "int8", "float32")):
        m = stack.client.get(f"/models/{name}").json()
        assert (m["quantization"], m["dtype"], m["parent"]) == (quant, dtype, "opt"), m
        q = m["quality"]
        assert q["perplexity_ratio"] <= q["max_perplexity_ratio"] and q["top1_agreement"] >= q["min_top1_agreement"]
        assert verify(stack.artifacts / name) == []
    r = stack.client.post("/models/opt/optimize", json={"passes": ["int8"]})
    assert_error(r, 409)  # opt-int8 exists

    r = stack.client.post("/models/opt/optimize", json={"passes": ["fp16"], "min_top1_agreement": 1.0,
                                                         "max_perplexity_ratio": 1.0000001})
    job = stack.wait_job(r.json()["id"], timeout=120)
    if job["stage"] == "failed":  # fp16 can match exactly on a tiny model; a failure must leave nothing
        assert "quality gate failed" in job["error"]
        assert not (stack.artifacts / "opt-fp16").exists()
    assert not any(p.name.startswith("opt-") for p in (stack.artifacts / ".tmp").iterdir())


# ---------------------------------------------------------------------------------------------- status
def test_status_and_metrics(stack: Stack) -> None:
    s = stack.client.get("/status").json()
    assert s["disk"]["free"] > 0 and s["models"] >= 1 and s["jobs"]["job_workers"] >= 1
    assert {"queued", "started", "finished", "failed"} <= set(s["jobs"])
    text = stack.client.get("/metrics").text
    assert 'spindle_manager_jobs_total{kind="pull",state="finished"}' in text
    dl = [ln for ln in text.splitlines() if ln.startswith("spindle_manager_download_bytes_total")]
    assert dl and float(dl[0].split()[-1]) > 400_000
    assert "spindle_manager_disk_free_bytes" in text
    assert stack.client.get("/health").json() == {"status": "ok"}
    jobs = stack.client.get("/models/jobs").json()["data"]
    assert jobs and {"id", "kind", "stage", "bytes_done"} <= set(jobs[0])


# ---------------------------------------------------------------------------------------------- CLI
def test_the_spindle_models_cli(stack: Stack, tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main as spindle

    env = {**stack.env, "MANAGER_URL": stack.url, "ADMIN_API_KEY": ADMIN_KEY}
    r = subprocess.run([sys.executable, "-m", "launcher", "models", "pull", "test/tiny-llama", "--name", "cli-pulled"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ready: cli-pulled" in r.stdout, r.stderr
    assert "100.0%" in r.stderr  # the progress bar (one line per stage when not on a terminal)

    def cli(*args: str, key: str = ADMIN_KEY) -> tuple[int, str, str]:
        code = spindle(["models", "--url", stack.url, "--admin-key", key, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("ls")
    assert code == 0 and any(ln.split()[0] == "cli-pulled" for ln in out.splitlines()[1:])
    code, out, err = cli("import", str(tiny_artifacts / "tiny-qwen2"), "--name", "cli-imported")
    assert code == 0 and "ready: cli-imported" in out, err
    code, out, _ = cli("search", "tiny")
    assert code == 0 and "test/tiny-llama" in out
    assert '"id": "cli-imported"' in cli("show", "cli-imported")[1]
    assert cli("rm", "cli-pulled")[0] == 0 and not (stack.artifacts / "cli-pulled").exists()
    code, _, err = cli("rm", "cli-pulled")
    assert code == 1 and "does not exist" in err
    code, _, err = cli("pull", "../etc")
    assert code == 1 and "invalid repo_id" in err
    code, _, err = cli("rm", "cli-imported", key="wrong")
    assert code == 1 and "admin API key" in err
    code, _, err = spindle(["models", "--url", f"http://127.0.0.1:{free_port()}", "ls"]), *capsys.readouterr()
    assert code == 1 and "cannot reach the model-manager" in err

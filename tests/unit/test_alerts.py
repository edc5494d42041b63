"""deploy/prometheus: promtool checks the scrape config and the alert rules and runs the rules' unit
tests (alerts_test.yml); every metric a rule reads is one a service exports; every alert has a runbook
section and a unit test."""

from __future__ import annotations

import re
import subprocess

import yaml

from protocol.settings import REPO_ROOT
from tests.unit.exported_metrics import all_exported, exported, metric_names, promtool

PROM = REPO_ROOT / "deploy/prometheus"
RULES = yaml.safe_load((PROM / "alerts.yml").read_text())
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"] if "alert" in rule]
# What the issue asks alerts for, by the alert that covers it.
REQUIRED = {"high TTFT p95": "SpindleHighTTFT", "queue backing up": "SpindleQueueBackingUp",
            "no live worker": "SpindleNoLiveWorker", "error rate": "SpindleHighErrorRate",
            "KV cache near full": "SpindleKVCacheNearFull", "dead letters": "SpindleDeadLetters",
            "Redis down": "SpindleRedisDown"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def test_promtool_check_config():
    res = run("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules():
    res = run("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules():
    res = run("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules_catches_a_wrong_expectation(tmp_path):
    """The unit tests compare labels and rendered annotations: a wrong one fails (so green means something)."""
    broken = (PROM / "alerts_test.yml").read_text().replace("is 95% used", "is 50% used")
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text())
    (tmp_path / "alerts_test.yml").write_text(broken)
    res = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "SpindleKVCacheNearFull" in res.stdout + res.stderr


def test_required_alerts_exist():
    names = {a["alert"] for a in ALERTS}
    assert set(REQUIRED.values()) <= names, set(REQUIRED.values()) - names


def test_every_alert_reads_exported_metrics():
    known = all_exported()
    for alert in ALERTS:
        unknown = metric_names(alert["expr"]) - known
        assert not unknown, f"{alert['alert']} reads metrics no service exports: {unknown}"


def test_every_alert_has_a_unit_test_and_a_runbook_section():
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    runbook = (REPO_ROOT / "docs/runbook.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    for alert in ALERTS:
        name = alert["alert"]
        assert name in tested, f"{name} has no test in alerts_test.yml"
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/runbook.md#{name.lower()}", url
        assert name.lower() in headings, f"docs/runbook.md has no '## {name}' section"


def test_scrape_config_names_every_service():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert jobs["model-manager"]["static_configs"][0]["targets"] == ["model-manager:8001"]
    for worker in ("worker", "worker-gpu"):  # every replica, found through Docker's DNS
        assert jobs[worker]["dns_sd_configs"][0] == {"names": [worker], "type": "A", "port": 9100,
                                                     "refresh_interval": "15s"}
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["worker"]["environment"]["WORKER_METRICS_PORT"] == "9100"
    assert compose["worker"]["environment"]["WORKER_METRICS_HOST"] == "0.0.0.0"
    assert set(jobs) - {"prometheus"} <= set(compose)


def test_vllm_names_are_exported_where_the_issue_asks():
    worker = exported()["worker"]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "spindle_batch_size_bucket",
                 "spindle_step_seconds_bucket", "spindle_takeovers_total", "spindle_dead_letters_total",
                 "llm_engine_errors_total"):
        assert name in worker, name
    gateway = exported()["gateway"]
    for name in ("llm_requests_total", "llm_requests_in_progress", "llm_request_duration_seconds_bucket",
                 "llm_generation_tokens_bucket", "llm_engine_errors_total", "spindle_queue_depth",
                 "spindle_workers_live", "spindle_admission_rejections_total", "spindle_redis_up"):
        assert name in gateway, name
    manager = exported()["model-manager"]
    assert {"spindle_manager_jobs_total", "spindle_manager_download_bytes_total"} <= manager


def test_metric_names_of_an_expression():
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket'
            '{job="gateway", model_name=~"$model"}[$__rate_interval]))) > 2 and on() up == 0 '
            'or vector(0) / scalar(max(spindle_queue_capacity{job="gateway"}))')
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "up", "spindle_queue_capacity"}


def test_k8s_scrape_config_names_jobs_after_the_components():
    """On Kubernetes the alerts' job="gateway" / job=~"worker.*" must match: the scrape config relabels
    `job` from each pod's component label, and every scraped Deployment carries one of those names."""
    # (promtool cannot check this file here: Debian builds it without the kubernetes service discovery.)
    config = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    relabels = config["scrape_configs"][0]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "action": "replace",
            "target_label": "job"} in relabels
    components = set()
    for path in (REPO_ROOT / "deploy/k8s/base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                template = doc["spec"]["template"]["metadata"]
                if template.get("annotations", {}).get("prometheus.io/scrape") == "true":
                    components.add(template["labels"]["app.kubernetes.io/component"])
    assert components == {"gateway", "worker", "model-manager"}
    jobs_in_alerts = set(re.findall(r'job=~?"([^"]+)"', (PROM / "alerts.yml").read_text()))
    assert all(any(re.fullmatch(j, c) for c in components) for j in jobs_in_alerts), jobs_in_alerts

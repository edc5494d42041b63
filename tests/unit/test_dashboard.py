"""deploy/grafana: the dashboard JSON parses, its layout is sound, every query names only metrics the
services export (and is valid PromQL, checked by promtool), and the provisioning files point at it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from protocol.settings import REPO_ROOT
from tests.unit.exported_metrics import all_exported, metric_names, promtool

GRAFANA = REPO_ROOT / "deploy/grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards/spindle.json").read_text())
PANELS = DASHBOARD["panels"]
QUERIES = [(p["title"], t["expr"]) for p in PANELS for t in p.get("targets", [])]
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
# Grafana's variables, replaced by values PromQL accepts before promtool sees a query.
GRAFANA_VALUES = {"$__rate_interval": "1m", "$model": "m", "$instance": "i"}


def test_dashboard_shape():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in PANELS:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"{p['title']} has no query"
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    assert VARIABLES["datasource"]["type"] == "datasource" and VARIABLES["datasource"]["query"] == "prometheus"


def test_no_panels_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in PANELS:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_what_the_issue_asks_is_on_the_dashboard():
    titles = " | ".join(p["title"] for p in PANELS).lower()
    for words in ("requests/s", "tokens/s", "time to first token", "inter-token latency", "queue depth",
                  "running / waiting", "kv cache", "errors", "worker $instance"):
        assert words in titles, words
    rows = [p for p in PANELS if p["type"] == "row"]
    assert any(r.get("repeat") == "instance" for r in rows), "a row repeated per worker"
    exprs = " ".join(e for _, e in QUERIES)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket" in exprs


@pytest.mark.parametrize(("title", "expr"), QUERIES, ids=[f"{i}-{t}" for i, (t, _) in enumerate(QUERIES)])
def test_every_query_names_exported_metrics(title, expr):
    names = metric_names(expr)
    assert names, f"{title}: no metric found in {expr!r}"
    unknown = names - all_exported()
    assert not unknown, f"{title} queries metrics no service exports: {unknown}"


def test_variables_query_exported_metrics():
    for name in ("model", "instance"):
        query = VARIABLES[name]["query"]["query"]
        m = re.fullmatch(r"label_values\(([\w:]+), (\w+)\)", query)
        assert m and m.group(1) in all_exported(), query
        assert f"${name}" in json.dumps(PANELS), f"${name} is never used"


def test_every_query_is_valid_promql(tmp_path):
    """Each query as a recording rule: promtool's parser checks it."""
    rules = []
    for i, (_, expr) in enumerate(QUERIES):
        for var, val in GRAFANA_VALUES.items():
            expr = expr.replace(var, val)
        assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_provisioning_points_at_the_dashboard_and_prometheus():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090" and ds[0]["isDefault"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/spindle.yml").read_text())["providers"][0]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    grafana = compose["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in compose["prometheus"]["volumes"]
    for svc in ("prometheus", "grafana"):
        assert compose[svc]["profiles"] == ["observability"]

"""The deployment files agree with the server: every series the Grafana dashboard queries is
one the server exports, and the dashboard's data source is the one provisioned."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rexomni_server.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rexomni.json"
SERIES = re.compile(r"\b(rexomni_[a-z_]+|vllm:[a-z_:]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def dashboard_series(prefix: str) -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    return {name for expr in exprs for name in SERIES.findall(expr) if name.startswith(prefix)}


def test_dashboard_queries_only_series_the_server_exports() -> None:
    exported = {family.name + suffix for family in Metrics().registry.collect() for suffix in SUFFIXES[family.type]}
    queried = dashboard_series("rexomni_")
    assert len(queried) >= 10
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"


def test_dashboard_uses_the_provisioned_data_source() -> None:
    provisioned = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uids = set(re.findall(r"^\s*uid:\s*(\S+)", provisioned, re.MULTILINE))
    dashboard = json.loads(DASHBOARD.read_text())
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used and used <= uids
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

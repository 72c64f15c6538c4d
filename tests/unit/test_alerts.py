"""The alert rules (deploy/prometheus/): valid, each one firing on the case it watches and quiet on a
healthy server (promtool's own unit tests), loaded by the Prometheus config as compose mounts it,
and built only on what exists: series the server exports (a live registry's), vLLM's, kube-state-
metrics' and Prometheus' `up`; statuses the server records, with exactly the 5xx ones counted as
server errors; settings the server has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from rexomni_server.accounting import CANCELLED, INTERNAL, OK
from rexomni_server.errors import RexOmniError
from rexomni_server.metrics import Metrics
from rexomni_server.settings import Settings, unknown_env_settings
from rexomni_server.transport.http import FRAMEWORK_ERROR_CODES, http_status
from tests.support import required_program

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rexomni.json"
SERVER = Settings()

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# kube-state-metrics' series the rules use (its documented names; Kubernetes only).
KUBE_STATE_SERIES = {
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
    "kube_deployment_status_replicas_unavailable",
    "kube_pod_container_status_restarts_total",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring"}
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promtool() -> str:
    return required_program("promtool", "`make system-deps` installs it, with Prometheus")


def run_promtool(*args: str | Path) -> str:
    done = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in IDENTIFIER.finditer(expr):
        follows = expr[match.end() :].lstrip()
        if match.group() not in PROMQL_KEYWORDS and not follows.startswith("("):  # not a function
            names.add(match.group())
    return names


def recorded_statuses() -> dict[str, int]:
    """Every status a request can end with, and its HTTP status: the domain errors' codes, the
    web framework's refusals, "internal" (500), "ok" and "cancelled" (499)."""

    def subclasses(cls: type[RexOmniError]) -> list[type[RexOmniError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    statuses = {cls.code: http_status(cls("")) for cls in subclasses(RexOmniError) if cls is not RexOmniError}
    statuses |= {code: status for status, code in FRAMEWORK_ERROR_CODES.items()}
    return {**statuses, INTERNAL: 500, OK: 200, CANCELLED: 499}


def test_the_rules_are_valid() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", RULES)


def test_every_alert_fires_on_its_case_and_none_on_a_healthy_server() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS)
    # The unit tests cover every alert both ways.
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    assert yaml.safe_load(RULE_TESTS.read_text())["rule_files"] == [RULES.name]
    checks = [(case["name"], check) for case in cases for check in case["alert_rule_test"]]
    alerts = {rule["alert"] for rule in rules()}
    fired = {check["alertname"] for _, check in checks if check.get("exp_alerts")}
    quiet_when_healthy = {check["alertname"] for name, check in checks if name == "healthy" and not check["exp_alerts"]}
    assert fired == alerts, f"never shown firing: {sorted(alerts - fired)}"
    assert quiet_when_healthy == alerts, f"not shown quiet on a healthy server: {sorted(alerts - quiet_when_healthy)}"


def test_every_alert_waits_is_graded_and_says_what_to_do() -> None:
    assert len(rules()) >= 10
    for rule in rules():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "Runbook:" in rule["annotations"]["description"], rule["alert"]


def test_the_prometheus_config_loads_the_rules_in_the_repository_and_in_compose(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert [(CONFIG.parent / path).resolve() for path in config["rule_files"]] == [RULES.resolve()]
    assert "SUCCESS: 1 rule files found" in run_promtool("check", "config", CONFIG)
    # The container's layout, from compose's mounts: the same relative paths must hold there.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = [volume.split(":") for volume in compose["services"]["prometheus"]["volumes"]]
    for source, target, *_ in mounts:
        copy = tmp_path / target.lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / source, copy)
    container_config = tmp_path / "etc" / "prometheus" / "prometheus.yml"
    assert "SUCCESS: 1 rule files found" in run_promtool("check", "config", container_config)


def test_alerts_use_only_series_that_exist() -> None:
    registry = Metrics().registry
    exported = {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}
    # vLLM's: those the dashboard queries too, which the vLLM tests find on a real vLLM's /metrics.
    panels = json.loads(DASHBOARD.read_text())["panels"]
    dashboard_vllm = {name for p in panels for t in p["targets"] for name in re.findall(r"vllm:[a-z_:]+", t["expr"])}
    known = exported | dashboard_vllm | KUBE_STATE_SERIES | {"up"}
    used = {name for rule in rules() for name in series_names(rule["expr"])}
    assert used <= known, f"not exported by anything the rules watch: {sorted(used - known)}"
    assert {"up", "rexomni_requests_total", "rexomni_in_flight_requests"} <= used
    assert {name for name in used if name.startswith("rexomni_")} <= exported


def test_statuses_in_the_rules_are_the_servers_and_5xx_means_5xx() -> None:
    statuses = recorded_statuses()
    assert {"ok", "overloaded", "engine_dead", "engine_failure", "timeout", "internal"} <= set(statuses)
    named: dict[str, set[str]] = {}
    for rule in rules():
        for op, value in re.findall(r'status\s*(=~|=)\s*"([^"]*)"', rule["expr"]):
            words = set(value.split("|")) if op == "=~" else {value}
            named[rule["alert"]] = named.get(rule["alert"], set()) | words
            assert words - {"http_5.."} <= set(statuses), f"{rule['alert']}: {sorted(words - set(statuses))}"
    server_errors = {code for code, status in statuses.items() if status >= 500}
    # http_5.. : a 5xx the server's handlers did not name (recorded as http_<status>).
    assert named["RexOmniHighServerErrorRate"] == server_errors | {"http_5.."}
    assert named["RexOmniOverloaded"] == {"overloaded"} and statuses["overloaded"] == 429
    assert named["RexOmniEngineDead"] == {"engine_dead"}
    assert named["RexOmniEngineFailures"] == {"engine_failure", "internal"}


def test_thresholds_and_advice_follow_the_server_settings() -> None:
    text = RULES.read_text()
    (queue,) = [rule for rule in rules() if rule["alert"] == "RexOmniQueueSaturated"]
    assert queue["expr"].rstrip().endswith(f"* {SERVER.max_queue}")  # REXOMNI_MAX_QUEUE's default
    assert f"REXOMNI_MAX_QUEUE ({SERVER.max_queue})" in queue["annotations"]["description"]
    # p95 targets sit on bucket bounds of their histograms, where the quantile is exact.
    metrics = Metrics()
    for alert, histogram in (
        ("RexOmniHighLatency", metrics.latency),
        ("RexOmniSlowFirstDetection", metrics.first_detection),
    ):
        (rule,) = [rule for rule in rules() if rule["alert"] == alert]
        assert f"{histogram._name}_bucket" in rule["expr"]
        threshold = float(rule["expr"].rsplit(">", 1)[1])
        assert threshold in histogram._upper_bounds, (alert, threshold)
    # Every setting the advice names is one the server has.
    named = set(re.findall(r"\bREXOMNI_[A-Z_]+\b", text))
    assert named and unknown_env_settings(dict.fromkeys(named, "")) == []

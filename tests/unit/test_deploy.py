"""The deployment files agree with the server: every series the Grafana dashboard queries is
one the server exports, every REXOMNI_* variable they set is a real setting, and every probe,
port and path they name is one the server has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from rexomni_server.metrics import Metrics
from rexomni_server.settings import Settings, unknown_env_settings
from rexomni_server.transport.http import build_router

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


ROOT = DEPLOY.parent
SERVER = Settings()
HTTP_PATHS = {getattr(route, "path", "") for route in build_router().routes}


def test_every_environment_variable_the_deployments_set_is_a_setting() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    k8s = list(yaml.safe_load_all((DEPLOY / "k8s" / "rexomni.yaml").read_text()))
    containers = [
        c for doc in k8s if doc["kind"] == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    names = set(compose["services"]["rexomni"]["environment"])
    names |= {env["name"] for c in containers for env in c["env"]}
    names |= set(re.findall(r"\b(REXOMNI_[A-Z_]+)=", (ROOT / "Dockerfile").read_text()))
    assert {"REXOMNI_MODEL", "REXOMNI_ENGINE", "REXOMNI_GRPC_PORT"} <= names
    assert unknown_env_settings(dict.fromkeys(names, "")) == []


def test_compose_and_dockerfile_expose_the_server_ports_and_probe_a_real_path() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]["rexomni"]["ports"]) == {
        f"{SERVER.port}:{SERVER.port}",
        f"{SERVER.grpc_port}:{SERVER.grpc_port}",
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {SERVER.port} {SERVER.grpc_port}" in dockerfile
    # The health check probes a real path on the server's port (REXOMNI_PORT, else the default).
    probed = re.findall(r"://127\.0\.0\.1:'\+port\+'(/\w+)", dockerfile)
    assert probed and set(probed) <= HTTP_PATHS
    assert f"os.environ.get('REXOMNI_PORT','{SERVER.port}')" in dockerfile


def test_kubernetes_probes_ports_and_service_match_the_server() -> None:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "rexomni.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVER.port, "grpc": SERVER.grpc_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        if "httpGet" in spec:
            assert spec["httpGet"]["path"] in HTTP_PATHS and spec["httpGet"]["port"] in ports
        else:  # the gRPC health service (grpc.health.v1) runs beside Detect
            assert spec["grpc"]["port"] == ports["grpc"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in HTTP_PATHS
    # A Service named rexomni would otherwise inject REXOMNI_PORT=tcp://... into the pod.
    assert pod["spec"]["enableServiceLinks"] is False
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} == set(ports)
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}


def test_orchestrators_wait_longer_than_the_server_drains() -> None:
    """docker stop and Kubernetes kill after their grace period: it must outlast the drain."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["rexomni"]
    assert compose["stop_grace_period"].endswith("s")
    assert float(compose["stop_grace_period"][:-1]) > SERVER.drain_timeout_s
    k8s = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "rexomni.yaml").read_text())}
    assert k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > SERVER.drain_timeout_s

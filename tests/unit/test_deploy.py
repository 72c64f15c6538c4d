"""The deployment files agree with the server: every series the Grafana dashboard queries is
one the server exports, every REXOMNI_* variable they set is a real setting, and every probe,
port and path they name is one the server has. And they are closed by default: ports on
loopback, API keys required in Kubernetes, no privileges, a read-only root filesystem."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rexomni_server.auth import ApiKeys
from rexomni_server.metrics import Metrics
from rexomni_server.settings import Settings, unknown_env_settings
from rexomni_server.transport.http import build_router
from tests.unit.test_k8s import EVERY_TARGET, drain_seconds, prestop_seconds, rendered

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
# ${NAME:-default} / ${NAME-default}: what compose substitutes when NAME is unset.
INTERPOLATION = re.compile(r"\$\{(\w+):?-([^}]*)\}")


def published_port(spec: str) -> tuple[str, int, int]:
    """(host address, host port, container port) of a compose short-syntax port, with every
    ${NAME:-default} at its default; "" for an address means every interface."""
    address, _, ports = INTERPOLATION.sub(lambda m: m.group(2), spec).rpartition(":")
    address, _, host = address.rpartition(":")
    return address.strip("[]"), int(host), int(ports.split("/")[0])


def test_every_environment_variable_the_deployments_set_is_a_setting() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    # Every container of every workload that every Kubernetes overlay and component renders.
    containers = [
        c
        for target in EVERY_TARGET
        for doc in rendered(target)
        if "template" in doc.get("spec", {})
        for c in k8s_all_containers(doc["spec"]["template"]["spec"])
    ]
    names = set(compose["services"]["rexomni"]["environment"])
    names |= {env["name"] for c in containers for env in c.get("env", [])}
    names |= set(re.findall(r"\b(REXOMNI_[A-Z_]+)=", (ROOT / "Dockerfile").read_text()))
    assert {"REXOMNI_MODEL", "REXOMNI_ENGINE", "REXOMNI_GRPC_PORT"} <= names
    assert unknown_env_settings(dict.fromkeys(names, "")) == []


def test_compose_and_dockerfile_expose_the_server_ports_and_probe_a_real_path() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    published = [published_port(spec) for spec in compose["services"]["rexomni"]["ports"]]
    assert {(host, container) for _, host, container in published} == {
        (SERVER.port, SERVER.port),
        (SERVER.grpc_port, SERVER.grpc_port),
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {SERVER.port} {SERVER.grpc_port}" in dockerfile
    # The health check probes a real path on the server's port (REXOMNI_PORT, else the default).
    probed = re.findall(r"://127\.0\.0\.1:'\+port\+'(/\w+)", dockerfile)
    assert probed and set(probed) <= HTTP_PATHS
    assert f"os.environ.get('REXOMNI_PORT','{SERVER.port}')" in dockerfile


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_kubernetes_probes_ports_and_services_match_the_server(target: str) -> None:
    docs = rendered(target)
    deployment = k8s_deployment(target)
    pod = deployment["spec"]["template"]
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
    services = [doc["spec"] for doc in docs if doc["kind"] == "Service"]
    assert {p["targetPort"] for service in services for p in service["ports"]} == set(ports)
    for service in services:
        assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # A claim the pods mount is one the deployment creates (test_k8s: never one every replica shares).
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"}


def test_orchestrators_wait_longer_than_the_server_drains() -> None:
    """docker stop and Kubernetes kill after their grace period: it must outlast the drain (in
    Kubernetes, counted from the start of the preStop hook, which delays SIGTERM)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["rexomni"]
    assert compose["stop_grace_period"].endswith("s")
    assert float(compose["stop_grace_period"][:-1]) > SERVER.drain_timeout_s
    for target in EVERY_TARGET:
        container = k8s_server_container(target)
        drain = drain_seconds(container)
        assert drain >= SERVER.drain_timeout_s, target  # never a shorter drain than the server's default
        grace = k8s_pod_spec(target)["terminationGracePeriodSeconds"]
        assert grace > prestop_seconds(container) + drain, target


def test_orchestrators_restart_a_server_that_exits() -> None:
    """A failed model load or a dead engine makes the server exit with status 1 (and /health
    answer 503 meanwhile): the orchestrators must start a new one, not leave it down."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["rexomni"]
    assert compose["restart"] in ("always", "unless-stopped", "on-failure")
    for target in EVERY_TARGET:
        pod = k8s_pod_spec(target)
        assert pod.get("restartPolicy", "Always") == "Always", target
        (container,) = pod["containers"]
        liveness = container["livenessProbe"]  # probes what turns unhealthy when the engine dies
        assert "grpc" in liveness or liveness["httpGet"]["path"] == "/health"
        assert SERVER.engine_failure_exit_s < liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)


# -- secure defaults: loopback ports, keys required, least privilege, a read-only root filesystem --

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# Where the server's stack writes (HOME for everything that writes under ~): with a read-only root
# filesystem each must point into a writable mount.
CACHE_VARIABLES = {
    "HOME",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "VLLM_CACHE_ROOT",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCH_EXTENSIONS_DIR",
    "FLASHINFER_WORKSPACE_BASE",
    "CUDA_CACHE_PATH",
    "OUTLINES_CACHE_DIR",
    "NUMBA_CACHE_DIR",
}


def compose_service() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["rexomni"]
    return service


def k8s_deployment(target: str = "base") -> dict[str, Any]:
    """The server's Deployment as ``kubectl kustomize deploy/k8s/<target>`` renders it."""
    (deployment,) = [doc for doc in rendered(target) if doc["kind"] == "Deployment"]
    return deployment


def k8s_pod_spec(target: str = "base") -> dict[str, Any]:
    spec: dict[str, Any] = k8s_deployment(target)["spec"]["template"]["spec"]
    return spec


def k8s_all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for kind in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(kind, [])]


def k8s_server_container(target: str = "base") -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = k8s_pod_spec(target)["containers"]
    return container


def k8s_literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {env["name"]: env["value"] for env in container.get("env", []) if "value" in env}


def dockerfile_env() -> dict[str, str]:
    """Every NAME=VALUE of the Dockerfile's ENV instructions (continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in line.split()[1:]:
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def under(path: str, mounts: set[str]) -> bool:
    return any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in mounts)


def test_compose_publishes_every_port_on_loopback_unless_the_operator_opts_in() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    specs = [spec for service in services.values() for spec in service.get("ports", [])]
    assert specs
    for spec in specs:
        address, _, _ = published_port(spec)
        assert address in LOOPBACK, f"{spec} is published beyond loopback by default"
    # The server's ports take an opt-in address (never a REXOMNI_* name: those are server settings).
    for spec in compose_service()["ports"]:
        (name,) = {m.group(1) for m in INTERPOLATION.finditer(spec)}
        assert not name.startswith("REXOMNI_")


def test_compose_runs_the_server_with_least_privilege_on_a_read_only_root() -> None:
    service = compose_service()
    assert str(service["user"]).split(":")[0] == "1000"  # the image's user, never root
    assert service["cap_drop"] == ["ALL"] and not service.get("cap_add")
    assert {"no-new-privileges:true", "no-new-privileges"} & set(service["security_opt"])
    assert service.get("privileged", False) is False
    assert service["read_only"] is True
    # Still what vLLM needs: shared memory and a GPU.
    assert service["ipc"] == "host"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    # With the root read-only, every place the image's and compose's environment sends writes is
    # a tmpfs or a volume.
    writable = {entry.split(":")[0] for entry in service["tmpfs"]}
    writable |= {volume.split(":")[1] for volume in service["volumes"] if not volume.endswith(":ro")}
    assert {"/tmp", "/models"} <= writable
    env = {**dockerfile_env(), **service["environment"]}
    assert set(env) >= CACHE_VARIABLES
    for name in CACHE_VARIABLES:
        assert under(env[name], writable), f"{name}={env[name]} is not on a writable mount"


def test_dockerfile_sets_the_writable_places_the_manifest_does() -> None:
    """`docker run --read-only --tmpfs /tmp -v ...:/models` and Kubernetes (an emptyDir on /models)
    see the same layout."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    volumes = set(re.findall(r"^VOLUME\s+(\S+)", dockerfile, re.MULTILINE))
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)[-1]
    assert user.isdigit() and int(user) != 0  # numeric, so Kubernetes can check runAsNonRoot
    env, manifest = dockerfile_env(), k8s_literal_env(k8s_server_container())
    for name in CACHE_VARIABLES:
        assert env[name] == manifest[name]
        assert under(env[name], volumes | {"/tmp"}), f"{name}={env[name]}"
    assert "--read-only" in dockerfile and "--tmpfs /tmp" in dockerfile  # the documented way to run it


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_kubernetes_fails_closed_without_the_api_key_secret(target: str) -> None:
    container = k8s_server_container(target)
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["REXOMNI_REQUIRE_API_KEYS"]["value"] == "true"
    # The keys come from a secret, never the manifest, and a missing secret stops the pod.
    key_sources = [env[name] for name in ("REXOMNI_API_KEYS", "REXOMNI_API_KEYS_FILE") if name in env]
    assert key_sources and all("value" not in source for source in key_sources)
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    secret_volumes = [v["secret"] for v in k8s_pod_spec(target).get("volumes", []) if "secret" in v]
    assert secret_refs or secret_volumes
    for ref in secret_refs + secret_volumes:
        assert ref.get("optional", False) is False, f"{ref}: a missing secret would serve an open endpoint"


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_the_manifest_settings_refuse_to_start_without_a_key(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's REXOMNI_* values, with an empty key secret: the server stops at start-up."""
    for name in [n for n in os.environ if n.startswith("REXOMNI_")]:
        monkeypatch.delenv(name)
    for name, value in k8s_literal_env(k8s_server_container(target)).items():
        if name.startswith("REXOMNI_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("REXOMNI_API_KEYS", "")  # the secret's key holds nothing
    settings = Settings()
    assert settings.require_api_keys is True
    with pytest.raises(ValueError):
        ApiKeys.from_settings(settings)
    monkeypatch.setenv("REXOMNI_API_KEYS", "k1,k2")
    assert ApiKeys.from_settings(Settings()).keys == (b"k1", b"k2")


def test_require_api_keys_refuses_to_run_open(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REXOMNI_API_KEYS", "REXOMNI_API_KEYS_FILE", "REXOMNI_REQUIRE_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    for empty in ("", " , "):
        settings = Settings(require_api_keys=True, api_keys=empty)
        with pytest.raises(ValueError):
            ApiKeys.from_settings(settings)
    assert ApiKeys.from_settings(Settings(require_api_keys=True, api_keys="k")).enabled
    assert not ApiKeys.from_settings(Settings()).enabled  # open only when asked for: the default


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_kubernetes_pod_and_every_container_run_with_least_privilege(target: str) -> None:
    """The server's pods, init container included. (The opt-in node-cache-prep DaemonSet is the one
    exception, a chown with one capability: test_k8s.)"""
    pod = k8s_pod_spec(target)
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    pod_context = pod["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] == pod_context["runAsGroup"] == pod_context["fsGroup"] == 1000
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = k8s_all_containers(pod)
    assert containers
    for container in containers:
        context = container["securityContext"]
        effective = {**pod_context, **context}
        assert effective["runAsNonRoot"] is True and effective["runAsUser"] != 0, container["name"]
        assert effective["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add"), container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context.get("privileged", False) is False, container["name"]


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_kubernetes_read_only_root_leaves_every_cache_a_writable_mount(target: str) -> None:
    pod = k8s_pod_spec(target)
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [v for v in volumes.values() if v.get("emptyDir", {}).get("medium") == "Memory"]
    for container in k8s_all_containers(pod):
        mounts = {
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            if not m.get("readOnly") and {"emptyDir", "persistentVolumeClaim", "hostPath"} & set(volumes[m["name"]])
        }
        read_only = {m["mountPath"] for m in container.get("volumeMounts", []) if m.get("readOnly")}
        assert "/tmp" in mounts, container["name"]  # HOME, tempfile, vLLM's IPC
        env = k8s_literal_env(container)
        if container in pod["containers"]:
            assert "/dev/shm" in mounts, container["name"]  # vLLM's shared memory
            assert set(env) >= CACHE_VARIABLES, container["name"]
        for name, value in env.items():
            if name == "HF_HUB_CACHE" and env.get("HF_HUB_OFFLINE") == "1" and under(value, read_only):
                continue  # the server reads the weights (read-only, offline) that the init container wrote
            if name in CACHE_VARIABLES or value.startswith("/"):
                assert under(value, mounts), f"{container['name']}: {name}={value} is not on a writable mount"
    assert shm and all(v["emptyDir"].get("sizeLimit") for v in shm)  # vLLM's /dev/shm, in memory
    writable = [v for v in volumes.values() if "emptyDir" in v]
    assert all(v["emptyDir"].get("sizeLimit") for v in writable)  # a runaway cache cannot fill the node's disk

"""The Kubernetes deployment (deploy/k8s, kustomize) renders and holds together for scale-out:
every overlay renders, every object is valid for the Kubernetes API (and the ScaledObject for
KEDA's CRD), replicas are stateless (no volume every replica shares, but the ReadWriteMany
alternative), the weights are downloaded once per node and read offline, gRPC clients can balance
over every pod through a headless Service, pods leave the endpoints before they stop and drain
before they are killed, disruptions take one pod at a time, and the autoscalers keep a replica
and scale the Deployment on metrics the server exports.

Manifests are rendered with ``kubectl kustomize`` (once per directory); the other deployment
tests (test_deploy.py, test_deploy_security.py) read them through ``rendered`` here."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rexomni_server.metrics import Metrics
from rexomni_server.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject.schema.json"
OVERLAYS = ("autoscaled", "autoscaled-hpa", "awq", "gpu")
COMPONENTS = ("awq", "node-cache-prep", "weights-emptydir", "weights-rwx")
# Components are rendered as an overlay of the autoscaled one that adds them would be (several
# replicas, the case they must hold in; its namespace also for what they add).
COMPONENT_HOST = "overlays/autoscaled"
TARGETS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
EVERY_TARGET = (*TARGETS, *(f"components/{name}" for name in COMPONENTS))
# The oldest Kubernetes whose preStop `sleep` action is on by default (beta in 1.30), and the
# newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NODE_CACHE = "/var/cache/rexomni"
NAMESPACE = "rexomni"  # where the overlays put everything
SERVER = Settings()
AWQ_MODEL = "IDEA-Research/Rex-Omni-AWQ"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl (with its built-in kustomize) is not installed: the Kubernetes manifests cannot be rendered"
        )
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    if not target.startswith("components/"):
        return tuple(kustomize(K8S / target))
    # A component renders only inside a kustomization: a throwaway one, on COMPONENT_HOST.
    with tempfile.TemporaryDirectory() as tmp:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": NAMESPACE,
            "resources": [os.path.relpath(K8S / COMPONENT_HOST, tmp)],
            "components": [os.path.relpath(K8S / target, tmp)],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return tuple(kustomize(Path(tmp)))


def rendered(target: str) -> list[dict[str, Any]]:
    """The objects of ``kubectl kustomize deploy/k8s/<target>`` (a component: on COMPONENT_HOST),
    a copy the caller may change."""
    return copy.deepcopy(list(_render(target)))


def objects(target: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered(target) if obj["kind"] == kind]


def one(target: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [obj for obj in objects(target, kind) if name is None or obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: {len(found)} {kind} named {name or 'anything'}"
    return found[0]


def deployment(target: str) -> dict[str, Any]:
    return one(target, "Deployment", "rexomni")


def pod_spec(target: str) -> dict[str, Any]:
    spec: dict[str, Any] = deployment(target)["spec"]["template"]["spec"]
    return spec


def server_container(target: str) -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = pod_spec(target)["containers"]
    return container


def init_container(target: str) -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = pod_spec(target)["initContainers"]
    return container


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {env["name"]: env["value"] for env in container.get("env", []) if "value" in env}


def prestop_seconds(container: dict[str, Any]) -> float:
    """How long the preStop hook holds SIGTERM back: the sleep action, or an exec of sleep."""
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert PurePosixPath(command[0]).name == "sleep", command
    return float(command[1])


def drain_seconds(container: dict[str, Any]) -> float:
    return float(literal_env(container).get("REXOMNI_DRAIN_TIMEOUT_S", SERVER.drain_timeout_s))


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount ``path`` lies under (the deepest)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mounts, f"{container['name']}: {path} is on no volume"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def exported_gauges() -> set[str]:
    return {family.name for family in Metrics().registry.collect() if family.type == "gauge"}


# -- rendering and schemas --


def test_every_overlay_and_component_is_tested_and_renders() -> None:
    assert tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())) == OVERLAYS
    assert tuple(sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())) == COMPONENTS
    for target in EVERY_TARGET:
        kinds = {obj["kind"] for obj in rendered(target)}
        assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds, target
        if target != "base":  # the overlays place everything in one namespace
            assert {obj["metadata"].get("namespace") for obj in rendered(target)} == {NAMESPACE}, target


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", EVERY_TARGET)
def test_every_object_is_valid_for_the_kubernetes_api(target: str, version: str) -> None:
    """Strict: an unknown or misplaced field fails, as it does with kubectl's field validation."""
    checked = 0
    for obj in rendered(target):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked against KEDA's CRD schema below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(part) for part in err.absolute_path)
            pytest.fail(
                f"{target}: {obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {where}: {err.message}"
            )
        checked += 1
    assert checked >= 4


def test_the_kubernetes_validation_is_strict() -> None:
    """The check above would catch a misspelt field (a probe the kubelet would never run)."""
    broken = deployment("base")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def keda_validator() -> jsonschema.protocols.Validator:
    """KEDA's ScaledObject schema, as strict as the API server with field validation Strict: an
    object schema that lists its properties takes no other (a CRD's structural schema prunes
    unknown fields instead, which would hide a misspelt one). Its CEL rules (min <= max) are not
    JSON Schema: the autoscaler test checks that one."""

    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: strict(value) for key, value in node.items()}
        open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in node and not open_ended:
            node["additionalProperties"] = False
        return node

    schema = strict(json.loads(KEDA_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_the_scaled_object_is_valid_for_kedas_crd() -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    assert "keda" in schema["$comment"].lower() and "v1alpha1" in schema["$comment"]
    assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec", "status"}
    validator = keda_validator()
    scaled = one("overlays/autoscaled", "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(scaled)]
    assert errors == []
    # And the check is strict: a misspelt field, or a number where KEDA wants a string, fails.
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicas"] = 1
    number = copy.deepcopy(scaled)
    number["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    assert not validator.is_valid(misspelt) and not validator.is_valid(number)


# -- stateless replicas: the weights --


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_no_volume_is_shared_by_every_replica_but_a_read_write_many_claim(target: str) -> None:
    """A ReadWriteOnce claim in a Deployment binds every replica to one node (and one pod at a
    time): replicas keep their writable state in their own emptyDirs, take the weights from the
    node's cache (read-only), and only the RWX alternative shares a claim."""
    claims = {obj["metadata"]["name"]: obj for obj in objects(target, "PersistentVolumeClaim")}
    assert not objects(target, "StatefulSet")
    pod = pod_spec(target)
    server = server_container(target)
    for volume in pod["volumes"]:
        (source,) = set(volume) - {"name"}
        if source == "persistentVolumeClaim":
            claim = claims[volume["persistentVolumeClaim"]["claimName"]]  # defined here, not left to chance
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{target}: {volume['name']}"
            assert target == "components/weights-rwx"
        elif source == "hostPath":
            assert volume["hostPath"] == {"path": NODE_CACHE, "type": "DirectoryOrCreate"}, target
        else:
            assert source in ("emptyDir", "secret", "configMap"), f"{target}: {volume['name']} is a {source}"
        shared = source in ("persistentVolumeClaim", "hostPath")
        for mount in server["volumeMounts"]:
            if mount["name"] == volume["name"] and shared:
                assert mount.get("readOnly") is True, f"{target}: the server writes to shared {volume['name']}"
    mounted_claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) <= mounted_claims
    # The node cache by default; the components swap it for their alternative.
    expected = {"components/weights-rwx": "persistentVolumeClaim", "components/weights-emptydir": "emptyDir"}
    assert expected.get(target, "hostPath") in {v["name"]: v for v in pod["volumes"]}["weights"]


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_an_init_container_downloads_the_weights_the_server_reads_offline(target: str) -> None:
    init, server = init_container(target), server_container(target)
    init_env, env = literal_env(init), literal_env(server)
    assert init_env["REXOMNI_MODEL"] == env["REXOMNI_MODEL"]  # the model the server loads is the one downloaded
    assert env["HF_HUB_OFFLINE"] == "1"
    downloads, reads = mount_of(init, init_env["HF_HUB_CACHE"]), mount_of(server, env["HF_HUB_CACHE"])
    assert downloads["name"] == reads["name"] == "weights"
    assert init_env["HF_HUB_CACHE"] == env["HF_HUB_CACHE"] == downloads["mountPath"] == reads["mountPath"]
    assert not downloads.get("readOnly") and reads["readOnly"] is True
    assert init["image"] == server["image"]  # huggingface_hub comes with the server's (vLLM) image
    assert init["command"][:2] == ["python3", "-c"] and "flock" in init["command"][2]
    assert "nvidia.com/gpu" not in init["resources"].get("limits", {})  # downloading needs no GPU
    # Every other path the downloader writes is a writable mount of its own.
    for name, value in init_env.items():
        if value.startswith("/"):
            assert not mount_of(init, value).get("readOnly"), f"{target}: {name}={value}"


def run_download(cache: Path, home: Path, stub: Path) -> subprocess.Popen[str]:
    init = init_container("base")
    env = {
        **literal_env(init),
        "HF_HUB_CACHE": str(cache),
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "PYTHONPATH": str(stub),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    command = [sys.executable, *init["command"][1:]]  # python3, here this interpreter
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_download_runs_one_at_a_time_per_cache_and_names_an_unwritable_one(tmp_path: Path) -> None:
    """The init container's script itself, with a stand-in huggingface_hub: two pods starting on one
    node download one after the other (the second finds the files), and a cache directory the
    image's user cannot write stops the pod with the way out."""
    stub = tmp_path / "stub"
    (stub / "huggingface_hub").mkdir(parents=True)
    (stub / "huggingface_hub" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import os, time

            def snapshot_download(repo_id):
                log = os.path.join(os.environ["HF_HUB_CACHE"], "calls.log")
                with open(log, "a") as f:
                    f.write(f"start {repo_id}\\n")
                time.sleep(0.5)
                with open(log, "a") as f:
                    f.write("end\\n")
                return os.path.join(os.environ["HF_HUB_CACHE"], "snapshot")
            """
        )
    )
    cache = tmp_path / "node-cache"
    cache.mkdir()
    pods = [run_download(cache, tmp_path, stub) for _ in range(2)]
    for pod in pods:
        out, err = pod.communicate(timeout=60)
        assert pod.returncode == 0, err
        assert "weights ready:" in out
    model = literal_env(init_container("base"))["REXOMNI_MODEL"]
    assert (cache / "calls.log").read_text().split("\n") == [f"start {model}", "end", f"start {model}", "end", ""]
    missing = run_download(tmp_path / "not-prepared", tmp_path, stub)
    _, err = missing.communicate(timeout=60)
    assert missing.returncode != 0 and "not writable" in err and "README" in err


def test_the_node_cache_helper_is_the_one_root_container_and_chowns_only() -> None:
    """components/node-cache-prep: the kubelet creates a missing hostPath directory as root, and
    fsGroup does not apply to hostPath. Its init container gives the directory to the image's user
    with the CHOWN capability alone; nothing it runs stays, and it receives no traffic."""
    target = "components/node-cache-prep"
    daemon = one(target, "DaemonSet", "rexomni-node-cache")
    pod = daemon["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (chown,) = pod["initContainers"]
    context = chown["securityContext"]
    assert context["runAsUser"] == 0
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    owner = {"runAsUser": pod["securityContext"]["runAsUser"], "runAsGroup": pod["securityContext"]["runAsGroup"]}
    assert f"{owner['runAsUser']}, {owner['runAsGroup']}" in chown["command"][-1]
    for container in pod["containers"]:  # what stays runs as the image's user, without capabilities
        effective = {**pod["securityContext"], **container["securityContext"]}
        assert effective["runAsNonRoot"] is True and effective["runAsUser"] != 0
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[chown["volumeMounts"][0]["name"]]["hostPath"] == {"path": NODE_CACHE, "type": "DirectoryOrCreate"}
    labels = daemon["spec"]["template"]["metadata"]["labels"]
    for selector in [s["spec"]["selector"] for s in objects(target, "Service")] + [
        one(target, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    ]:
        assert not selector.items() <= labels.items()
    assert pod_spec(target)["securityContext"]["runAsUser"] == owner["runAsUser"]  # the owner the server runs as


# -- serving: Services, updates, disruptions, stopping --


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_a_headless_service_resolves_to_every_ready_pod_for_grpc(target: str) -> None:
    """dns:///rexomni-grpc.<namespace>.svc.cluster.local:50051 resolves to each ready pod's own address;
    the clients balance round-robin over them and re-resolve as the server ages connections out."""
    headless = one(target, "Service", "rexomni-grpc")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses")  # a loading or draining pod is not in the answer
    (port,) = headless["ports"]
    assert port["port"] == SERVER.grpc_port and port["appProtocol"] == "grpc"
    container_ports = {p["name"]: p["containerPort"] for p in server_container(target)["ports"]}
    assert container_ports[port["targetPort"]] == SERVER.grpc_port
    template = deployment(target)["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"] == deployment(target)["spec"]["selector"]["matchLabels"]
    assert headless["selector"].items() <= template.items()
    age = float(literal_env(server_container(target)).get("REXOMNI_GRPC_MAX_CONNECTION_AGE_S", 0) or 0)
    assert 0 < age <= SERVER.grpc_max_connection_age_s  # connections end, so new pods are found
    http = one(target, "Service", "rexomni")["spec"]
    assert http.get("type", "ClusterIP") == "ClusterIP" and http.get("clusterIP") != "None"
    assert {p["name"]: p["port"] for p in http["ports"]}["http"] == SERVER.port


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_pods_leave_the_endpoints_before_they_stop_and_drain_before_they_are_killed(target: str) -> None:
    pod, server = pod_spec(target), server_container(target)
    delay = prestop_seconds(server)
    assert delay >= 5  # endpoints, proxies and DNS need a few seconds to drop the pod
    assert pod["terminationGracePeriodSeconds"] > delay + drain_seconds(server)
    budget = one(target, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"] == deployment(target)["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_updates_surge_where_a_spare_gpu_allows_and_never_recreate(target: str) -> None:
    spec = deployment(target)["spec"]
    strategy = spec["strategy"]
    assert strategy["type"] == "RollingUpdate"  # no shared ReadWriteOnce volume to hand over any more
    rolling = strategy["rollingUpdate"]
    if target in ("overlays/gpu", "overlays/awq"):
        # One GPU: the old pod must free it before the new one can start.
        assert spec["replicas"] == 1 and rolling == {"maxSurge": 0, "maxUnavailable": 1}
    else:
        assert rolling == {"maxSurge": 1, "maxUnavailable": 0}  # capacity never drops during an update
    assert spec["progressDeadlineSeconds"] >= 20 * 60  # a first start downloads and compiles
    startup = server_container(target)["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60


# -- autoscaling --


def query_namespaces(query: str) -> set[str]:
    return set(re.findall(r'namespace="([^"]+)"', query))


def test_the_keda_autoscaler_keeps_a_replica_and_scales_the_deployment_on_server_metrics() -> None:
    target = "overlays/autoscaled"
    scaled, dep = one(target, "ScaledObject"), deployment(target)
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    assert ref["name"] == dep["metadata"]["name"]
    assert ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # never zero: cold starts take minutes
    assert "replicas" not in dep["spec"]  # the autoscaler's, not reset by every apply
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    gauges = exported_gauges()
    thresholds = {}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
        query = trigger["metadata"]["query"]
        # AverageValue: the query is the total over the replicas, the threshold per replica.
        assert query.startswith("sum(")
        (metric,) = set(re.findall(r"\b(rexomni_[a-z_]+)\{", query))
        assert metric in gauges
        assert query_namespaces(query) == {scaled["metadata"]["namespace"]} == {dep["metadata"]["namespace"]}
        thresholds[metric] = float(trigger["metadata"]["threshold"])
        assert 0 < thresholds[metric] < SERVER.max_queue
    assert set(thresholds) == {"rexomni_queue_depth", "rexomni_in_flight_requests"}
    # The HPA alternative applies the same policy.
    hpa = one("overlays/autoscaled-hpa", "HorizontalPodAutoscaler")["spec"]
    targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]}
    assert targets == thresholds
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert hpa["behavior"] == behavior


def test_the_hpa_alternative_keeps_a_replica_and_scales_the_deployment_on_pod_metrics() -> None:
    target = "overlays/autoscaled-hpa"
    hpa, dep = one(target, "HorizontalPodAutoscaler"), deployment(target)
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    assert "replicas" not in dep["spec"]
    assert hpa["metadata"]["namespace"] == dep["metadata"]["namespace"]
    gauges = exported_gauges()
    for metric in spec["metrics"]:
        assert metric["type"] == "Pods"  # per pod, served by prometheus-adapter
        assert metric["pods"]["metric"]["name"] in gauges
        assert metric["pods"]["target"]["type"] == "AverageValue"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert not objects(target, "ScaledObject")


def test_fixed_overlays_have_no_autoscaler() -> None:
    for target in ("base", "overlays/gpu", "overlays/awq"):
        assert not objects(target, "ScaledObject") and not objects(target, "HorizontalPodAutoscaler")
        assert deployment(target)["spec"]["replicas"] >= 1


# -- the AWQ weights --


@pytest.mark.parametrize("target", ["overlays/awq", "components/awq"])
def test_the_awq_overlay_downloads_and_serves_the_awq_checkpoint(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = literal_env(server_container(target))
    assert env["REXOMNI_MODEL"] == literal_env(init_container(target))["REXOMNI_MODEL"] == AWQ_MODEL
    for name in [n for n in os.environ if n.startswith("REXOMNI_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("REXOMNI_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.model, settings.quantization, settings.engine) == (AWQ_MODEL, "awq", "vllm")
    for other in ("base", "overlays/gpu", "overlays/autoscaled"):
        assert "REXOMNI_QUANTIZATION" not in literal_env(server_container(other))
        assert literal_env(server_container(other))["REXOMNI_MODEL"] != AWQ_MODEL


@pytest.mark.parametrize("target", EVERY_TARGET)
def test_every_environment_value_is_a_string(target: str) -> None:
    for obj in rendered(target):
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            for entry in container.get("env", []):
                assert "value" not in entry or isinstance(entry["value"], str), f"{target}: {entry}"

"""The Kubernetes manifest's secure defaults hold for the real server process: with the environment
of the server container that ``kubectl kustomize deploy/k8s/base`` renders, it refuses to start on
an empty key secret, and it serves from a read-only root filesystem with only the manifest's
writable mounts (/tmp and the /models emptyDir) writable; the weights' mount (HF_HUB_CACHE) is
read-only there too.

The read-only root is made with a private mount namespace (util-linux ``unshare`` and
``setpriv``): / is remounted read-only, a fresh directory is bound over /tmp, and the server runs
with no capability and no_new_privs. Where mount namespaces are not permitted the test skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import httpx
import pytest

from rexomni_client import RexOmniClient, RexOmniHTTPError
from tests.support import free_port, image_bytes, stop_process, wait_ready
from tests.unit.test_k8s import pod_spec

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "base"  # deploy/k8s/base, rendered
TMP = PurePosixPath("/tmp")
# Inside the namespace the manifest's other writable volumes (/models) are directories under /tmp/volumes.
VOLUMES = TMP / "volumes"
KEY = "deploy-test-key"
SERVE = [sys.executable, "-m", "rexomni_server.cli", "serve", "--host", "127.0.0.1", "--no-grpc"]


def manifest_env() -> dict[str, str]:
    """The server container's literal environment, a path on one of its writable volumes other than
    /tmp moved to where this test keeps that volume; every other path is left read-only."""
    pod = pod_spec(MANIFEST)
    (container,) = pod["containers"]
    writable = {v["name"] for v in pod["volumes"] if {"emptyDir", "persistentVolumeClaim", "hostPath"} & set(v)}
    volumes = [
        PurePosixPath(m["mountPath"])
        for m in container["volumeMounts"]
        if m["name"] in writable and not m.get("readOnly") and m["mountPath"] not in ("/tmp", "/dev/shm")
    ]
    env = {}
    for entry in container["env"]:
        if "value" not in entry:
            continue  # the secret's keys: the test gives its own
        value = entry["value"]
        if any(PurePosixPath(value).is_relative_to(volume) for volume in volumes):
            value = str(VOLUMES / value.lstrip("/"))
        env[entry["name"]] = value
    return env


# $1: the directory that becomes /tmp; the rest: the command, without capabilities.
# $2: the code under test where it lives under /tmp (a checkout there), kept visible (read-only)
# inside the new /tmp; colon-separated, may be empty.
READ_ONLY_ROOT = """set -e
tmp="$1"; keep="$2"; shift 2
IFS=:
for path in $keep; do mkdir -p "$tmp/${path#/tmp/}"; mount --bind "$path" "$tmp/${path#/tmp/}"; done
unset IFS
mount --rbind "$tmp" /tmp
mount -t tmpfs -o size=256m tmpfs /dev/shm
mount -o remount,bind,ro /
exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"
"""


def code_under_tmp() -> list[str]:
    """The checkout and the interpreter's environment, where they live under /tmp: binding a
    fresh directory over /tmp would hide them from the server."""
    paths = sorted({ROOT, Path(sys.prefix).resolve()})
    outermost = [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]
    return [str(p) for p in outermost if p.is_relative_to(TMP)]


def read_only_root(tmp: Path) -> list[str]:
    """The command prefix that runs what follows with / read-only and ``tmp`` as /tmp, or a skip."""
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    prefix = [*unshare, "sh", "-c", READ_ONLY_ROOT, "sh", str(tmp), ":".join(code_under_tmp())]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "test ! -w / && test -w /tmp"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"no read-only mount namespace here: {probe.stderr.strip() or probe.returncode}")
    return prefix


@pytest.fixture
def server_on_read_only_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The tiny model on the transformers engine, under the manifest's environment and mounts."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    prefix = read_only_root(tmp)
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **manifest_env(), "REXOMNI_API_KEYS": KEY}
    assert env["REXOMNI_REQUIRE_API_KEYS"] == "true"
    # No --tiny-model-dir: the tiny checkpoint is generated under HOME, which must be writable.
    cmd = [*prefix, *SERVE, "--model", "tiny", "--engine", "transformers", "--device", "cpu", "--max-new-tokens", "8"]
    cmd += ["--port", str(port)]
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_ready(url, proc, log=log)
        yield url, tmp
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_server_serves_from_a_read_only_root_filesystem(server_on_read_only_root: tuple[str, Path]) -> None:
    url, tmp = server_on_read_only_root
    health = httpx.get(f"{url}/health", timeout=5).json()
    assert health["ready"] is True and health["engine"] == "transformers"
    # Keys are on (the manifest requires them): a detection needs one, and runs with it.
    with RexOmniClient(url) as client, pytest.raises(RexOmniHTTPError) as err:
        client.detect(image_bytes(64, 48), "detection", ["cat"])
    assert err.value.status == 401
    with RexOmniClient(url, api_key=KEY) as client:
        assert client.detect(image_bytes(64, 48), "detection", ["cat"]).task.value == "detection"
    # The tiny checkpoint went where the manifest's HOME points, a writable mount.
    home = PurePosixPath(manifest_env()["HOME"])
    assert (tmp / home.relative_to(TMP) / ".cache" / "rexomni" / "tiny-random" / "config.json").is_file()


def test_manifest_environment_with_an_empty_key_secret_stops_the_server(tmp_path: Path) -> None:
    """The manifest's settings (REXOMNI_REQUIRE_API_KEYS): `serve` exits at start-up instead of serving open."""
    settings = {name: value for name, value in manifest_env().items() if name.startswith("REXOMNI_")}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **settings, "REXOMNI_API_KEYS": ""}
    cmd = [*SERVE, "--engine", "scripted", "--port", "0"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started without an API key")
    assert proc.returncode != 0
    assert "api key" in proc.stderr.lower()

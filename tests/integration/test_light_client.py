"""`pip install rexomni` in a fresh environment is the client alone: what a client needs and
none of the server's packages, and its CLI talks to a real server over HTTP and gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import image_bytes, serve_process

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLIENT_NEEDS = {"httpx", "httpx-sse", "pydantic", "pillow", "grpcio", "protobuf", "tqdm"}
SERVER_ONLY = {
    "fastapi",
    "fastapi-offline",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "python-multipart",
    "pydantic-settings",
    "prometheus-client",
    "sse-starlette",
    "grpcio-health-checking",
    "grpcio-reflection",
    "torch",
    "transformers",
    "vllm",
}


def run(args: list[str | Path], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("client") / "venv"
    made = run([sys.executable, "-m", "venv", venv])
    assert made.returncode == 0, made.stderr
    installed = run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", ROOT], timeout=900)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-4000:]
    return venv


def test_the_client_install_brings_only_what_a_client_needs(client_venv: Path) -> None:
    listed = run([client_venv / "bin" / "python", "-m", "pip", "list", "--format", "json"])
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert names >= CLIENT_NEEDS
    assert not names & SERVER_ONLY, names & SERVER_ONLY


def test_the_light_client_talks_to_a_server_and_the_server_cli_says_what_it_lacks(
    client_venv: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes(64, 48))
    box = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><10><20><300><400><|box_end|>"
    options = json.dumps({"forced_output": box})
    rexomni = client_venv / "bin" / "rexomni"
    for url, _, health in serve_process(["--engine", "scripted", "--model", "scripted", "--allow-forced-output"]):
        for transport in (["--url", url], ["--grpc", str(health["grpc_target"])]):
            answered = run([rexomni, *transport, "detect", photo, "--categories", "cat", "--options", options])
            assert answered.returncode == 0, answered.stderr
            result = json.loads(answered.stdout)
            assert [d["label"] for d in result["detections"]] == ["cat"]
    server = run([client_venv / "bin" / "rexomni-server", "serve"])
    assert server.returncode == 1
    assert "pip install 'rexomni[server]'" in server.stderr and "Traceback" not in server.stderr

"""TLS on both transports (one certificate for HTTPS and gRPC), with a private CA made here:
clients that trust the CA get answers, plaintext clients get none, and half a TLS
configuration is refused before the server starts."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rexomni_client import AsyncRexOmniGrpcClient, RexOmniClient, RexOmniGrpcClient
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from tests.support import image_bytes

OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
PNG = image_bytes(64, 48)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1 and localhost."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rexomni test CA")])
    ca_constraints = x509.BasicConstraints(ca=True, path_length=0)
    ca = _certificate("rexomni test CA", ca_key, ca_name, ca_key, [(ca_constraints, True)])
    key = ec.generate_private_key(ec.SECP256R1())
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = _certificate("localhost", key, ca_name, ca_key, [(names, False)])
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
async def tls_servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Path, int, int]]:
    ca, cert, key = make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))
    settings = Settings(model="scripted", engine="scripted", tls_cert_file=cert, tls_key_file=key)
    runtime = Runtime(settings, engine=ScriptedEngine(default_output=OUTPUT))
    await runtime.engine.start()
    servers = await start_servers(runtime, "127.0.0.1", 0, 0)
    assert servers.http_port and servers.grpc_port
    yield ca, servers.http_port, servers.grpc_port
    await servers.stop(0)
    await runtime.stop()


async def test_https_with_the_ca_and_never_in_plaintext(tls_servers: tuple[Path, int, int]) -> None:
    ca, http_port, _ = tls_servers

    def detect() -> str:
        with RexOmniClient(f"https://127.0.0.1:{http_port}", ca_file=ca) as client:
            return client.detect(PNG, "detection", ["cat"]).detections[0].label

    assert await asyncio.to_thread(detect) == "cat"
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{http_port}/health")
    async with httpx.AsyncClient() as untrusting:  # the system roots do not know our CA
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(f"https://127.0.0.1:{http_port}/health")


async def test_grpc_over_tls_sync_and_async(tls_servers: tuple[Path, int, int]) -> None:
    ca, _, grpc_port = tls_servers
    target = f"127.0.0.1:{grpc_port}"

    def detect(**kw: object) -> str:
        with RexOmniGrpcClient(target, timeout=10, **kw) as client:  # type: ignore[arg-type]
            return client.detect(PNG, "detection", ["cat"]).detections[0].label

    assert await asyncio.to_thread(detect, ca_file=ca) == "cat"
    async with AsyncRexOmniGrpcClient(target, ca_file=ca) as client:
        assert [d.label for d in (await client.detect(PNG, "detection", ["cat"])).detections] == ["cat"]
    with pytest.raises(grpc.RpcError) as plaintext:
        await asyncio.to_thread(detect)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_half_a_tls_configuration_is_refused(tmp_path: Path) -> None:
    _, cert, key = make_ca_and_server_cert(tmp_path)
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        Settings(tls_cert_file=cert)
    with pytest.raises(ValueError, match="does not exist"):
        Settings(tls_cert_file=cert, tls_key_file=tmp_path / "missing.key")
    assert Settings(tls_cert_file=cert, tls_key_file=key).tls

"""gRPC across replicas: the Python clients spread calls over every address a target names
(gRPC's default, pick_first, sends them all to the first), and the server ages connections out
without cutting the calls in flight on them."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest

from rexomni_client.grpc import RexOmniGrpcClient
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectParams
from rexomni_server.transport.convert import params_to_pb
from tests.support import image_bytes, serve_process

pytestmark = pytest.mark.slow
SCRIPTED = ["--engine", "scripted", "--model", "scripted"]


def box(x: int) -> str:
    return f"<|object_ref_start|>cat<|object_ref_end|><|box_start|><{x}><2><30><40><|box_end|>"


CALLS = 20


def grpc_calls_served(url: str) -> int:
    """Detect calls a server answered over gRPC, from its own metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(int(float(n)) for n in re.findall(r'rexomni_requests_total\{[^}]*transport="grpc"[^}]*\} (\S+)', text))


def test_one_client_spreads_its_calls_over_two_servers() -> None:
    for url_a, _, health_a in serve_process(SCRIPTED):
        for url_b, _, health_b in serve_process(SCRIPTED):
            port_a = str(health_a["grpc_target"]).rsplit(":", 1)[1]
            port_b = str(health_b["grpc_target"]).rsplit(":", 1)[1]
            target = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
            with RexOmniGrpcClient(target, retries=0) as client:
                for _ in range(CALLS):
                    client.detect(image_bytes(64, 48), categories=["cat"])
            served = grpc_calls_served(url_a), grpc_calls_served(url_b)
            assert sum(served) == CALLS
            assert min(served) >= CALLS // 4, served  # round-robin: about half each

            # The same target on a plain channel (gRPC's default policy): all on one server.
            before = grpc_calls_served(url_a), grpc_calls_served(url_b)
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]
                request = params_to_pb(DetectParams(categories=["cat"]), image_bytes(64, 48))
                for _ in range(CALLS):
                    stub.Detect(request, timeout=30)
            added = grpc_calls_served(url_a) - before[0], grpc_calls_served(url_b) - before[1]
            assert sorted(added) == [0, CALLS], added


def test_an_aged_connection_lets_its_streams_finish() -> None:
    # Connections are asked to go after 1 s; a stream of ~3 s on one must still end whole.
    forced = ", ".join(box(x) for x in range(6))  # ~80 tokens
    args = [*SCRIPTED, "--allow-forced-output", "--scripted-token-delay-s", "0.04", "--grpc-max-connection-age-s", "1"]
    for _, _, health in serve_process(args):
        with RexOmniGrpcClient(str(health["grpc_target"]), retries=0) as client:
            for _ in range(2):  # the second on a new connection, the first having aged out
                events = list(client.detect_stream(image_bytes(64, 48), categories=["cat"], forced_output=forced))
                assert getattr(events[-1], "finish_reason", None) == "stop"
                assert len(events) == 6 + 1  # every detection, then the result

"""Python clients for the Rex-Omni server (HTTP and gRPC, sync and asyncio)."""

from rexomni_client.bulk import detect_many
from rexomni_client.grpc import AsyncRexOmniGrpcClient, RexOmniGrpcClient
from rexomni_client.http import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError

__all__ = [
    "AsyncRexOmniClient",
    "AsyncRexOmniGrpcClient",
    "RexOmniClient",
    "RexOmniGrpcClient",
    "RexOmniHTTPError",
    "detect_many",
]

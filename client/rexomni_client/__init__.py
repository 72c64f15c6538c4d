"""Python clients for the Rex-Omni server (HTTP and gRPC)."""

from rexomni_client.grpc import RexOmniGrpcClient
from rexomni_client.http import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError

__all__ = ["AsyncRexOmniClient", "RexOmniClient", "RexOmniGrpcClient", "RexOmniHTTPError"]

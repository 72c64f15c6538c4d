"""Python client for the Rex-Omni server."""

from rexomni_client.http import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError

__all__ = ["AsyncRexOmniClient", "RexOmniClient", "RexOmniHTTPError"]

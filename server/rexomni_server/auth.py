"""Optional API keys, checked by both transports before a request is read or queued.

Keys come from settings once (the composition root builds :class:`ApiKeys`); comparison is
constant-time so response timing does not reveal how much of a guessed key was right.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from rexomni_server.errors import Unauthenticated
from rexomni_server.settings import Settings

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
_BEARER = "bearer "
# HTTP Basic with the key as the password: what Label Studio can send to an ML backend.
_BASIC = "basic "


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[bytes, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Keys from ``api_keys`` and ``api_keys_file``; a file that cannot be read is an error
        at start-up, never a server that silently runs open."""
        raw = settings.api_keys.get_secret_value().split(",")
        if settings.api_keys_file is not None:
            try:
                raw += settings.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"api_keys_file {settings.api_keys_file}: {exc.strerror or exc}") from None
            if not any(line.strip() for line in raw):
                raise ValueError(f"api_keys_file {settings.api_keys_file} holds no key")
        keys = cls(tuple(key.strip().encode() for key in raw if key.strip()))
        if settings.require_api_keys and not keys.enabled:
            raise ValueError(
                "require_api_keys is set but no API key was given (REXOMNI_API_KEYS or REXOMNI_API_KEYS_FILE); "
                "set REXOMNI_REQUIRE_API_KEYS=false to serve an open endpoint on purpose"
            )
        return keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None, api_key: str | None) -> None:
        """Raises :class:`Unauthenticated` unless keys are off or one of them was given."""
        if not self.keys:
            return
        given = (api_key or "").strip()
        if not given and authorization and authorization[: len(_BEARER)].lower() == _BEARER:
            given = authorization[len(_BEARER) :].strip()
        if not given and authorization and authorization[: len(_BASIC)].lower() == _BASIC:
            given = basic_password(authorization[len(_BASIC) :])
        if not given:
            raise Unauthenticated(
                "an API key is required: send 'Authorization: Bearer KEY', 'x-api-key: KEY' "
                "or HTTP Basic with the key as the password"
            )
        candidate = given.encode()
        # Every key is compared (no early exit) so the time taken does not depend on which matched.
        matched = [hmac.compare_digest(candidate, key) for key in self.keys]
        if not any(matched):
            raise Unauthenticated("the API key is not valid")


def basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (the user name is not checked); "" if unreadable."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return ""
    return decoded.partition(":")[2].strip()

"""Domain errors. Transports map these (and only these) to status codes, one table each."""

from __future__ import annotations


class RexOmniError(Exception):
    """Base of every error the service raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(RexOmniError):
    code = "invalid_request"


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class UnsupportedImageFormat(InvalidImage):
    code = "unsupported_image_format"


class ImageTooLarge(InvalidImage):
    code = "image_too_large"


class MalformedRequest(InvalidRequest):
    """The request body cannot be parsed at all (not JSON, not multipart)."""


class BodyTimeout(InvalidRequest):
    """The client sent its request body too slowly (a slow-body attack looks like this)."""

    code = "body_timeout"


class Overloaded(RexOmniError):
    code = "overloaded"


class EngineNotReady(RexOmniError):
    code = "engine_not_ready"


class EngineDead(RexOmniError):
    """The engine can serve no more (its process died, a sticky device error): this server
    stops being ready and exits, so its orchestrator starts a fresh one."""

    code = "engine_dead"


class EngineFailure(RexOmniError):
    code = "engine_failure"


class RequestTimeout(RexOmniError):
    code = "timeout"


class Unauthenticated(RexOmniError):
    code = "unauthenticated"

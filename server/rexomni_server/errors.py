"""Domain errors. Transports map these (and only these) to status codes, one table each."""

from __future__ import annotations


class RexOmniError(Exception):
    """Base of every error the service raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        # Set once the service has logged and counted the failed request, so a transport
        # only accounts for errors raised before the request reached the service.
        self.accounted = False


class InvalidRequest(RexOmniError):
    code = "invalid_request"


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class UnsupportedImageFormat(InvalidImage):
    code = "unsupported_image_format"


class ImageTooLarge(InvalidImage):
    code = "image_too_large"


class Overloaded(RexOmniError):
    code = "overloaded"


class EngineNotReady(RexOmniError):
    code = "engine_not_ready"


class EngineFailure(RexOmniError):
    code = "engine_failure"


class RequestTimeout(RexOmniError):
    code = "timeout"


class Unauthenticated(RexOmniError):
    code = "unauthenticated"

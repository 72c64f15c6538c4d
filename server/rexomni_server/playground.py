"""The playground: a page at ``/`` to try the API in a browser.

Pick, drop or paste an image, choose a task, and the page sends it to ``POST /v1/detect/stream``
and draws every detection the moment it arrives. The page is static (plain HTML, CSS and
JavaScript shipped in the package, nothing fetched from elsewhere): it needs no API key itself;
a key typed into it is sent with the page's API calls. Its Content-Security-Policy lets it talk
to this server only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

ASSET_DIR = ("static", "playground")
PAGE = "index.html"
# Served under /playground/NAME: name -> media type.
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
ASSET_PREFIX = "/playground/"
# Every path the router serves: open without an API key (the page asks for the key itself).
PLAYGROUND_PATHS = frozenset({"/", *(ASSET_PREFIX + name for name in ASSETS)})

# The page may load its own script, style and the images it is given (data: and blob: URLs), and
# talk to this server only: nothing a page does leaves for another host.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load: an upgraded server never runs with a stale script.
    "Cache-Control": "no-cache",
}


def asset_bytes(name: str) -> bytes:
    """One of the playground's files, from the installed package."""
    return resources.files("rexomni_server").joinpath(*ASSET_DIR, name).read_bytes()


def playground_router() -> APIRouter:
    """``GET /`` (the page) and ``GET /playground/{playground.js,playground.css}``. The files
    are read once, here: a missing file fails at start-up, not on the first visit."""
    router = APIRouter(include_in_schema=False)
    page = asset_bytes(PAGE)

    @router.get("/")
    async def playground_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    for name, media_type in ASSETS.items():
        router.add_api_route(ASSET_PREFIX + name, _asset_endpoint(asset_bytes(name), media_type), methods=["GET"])
    return router


def _asset_endpoint(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def playground_asset() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return playground_asset

"""/docs and /redoc work on a machine without internet: every script, style and icon they load
is served by the server itself, without a key, and nothing points elsewhere."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from rexomni_server.app import create_app
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings

# src= / href= values, and url(...) in inline styles.
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*['"]?([^'")]+)""")
# What the generated pages pass to their scripts as locations.
SCRIPT_URL = re.compile(r"""(?:url|spec-url|openapi_url|oauth2RedirectUrl)\s*[:=]\s*['"]([^'"]+)['"]""")


@pytest.fixture
async def keyed_client() -> AsyncIterator[httpx.AsyncClient]:
    engine = ScriptedEngine()
    await engine.start()
    runtime = Runtime(Settings(api_keys="secret"), engine=engine, model_label="scripted")
    app = create_app(runtime=runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_api_pages_load_only_what_the_server_serves(keyed_client: httpx.AsyncClient, page: str) -> None:
    response = await keyed_client.get(page)  # no key: the description is open
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html, "the page points outside the server"
    references = [a or b for a, b in REFERENCE.findall(html)] + SCRIPT_URL.findall(html)
    assert any(ref.endswith(".js") for ref in references)
    for ref in references:
        assert ref.startswith("/"), ref
        asset = await keyed_client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.content, ref


async def test_the_assets_are_the_real_ones_and_other_paths_still_need_a_key(
    keyed_client: httpx.AsyncClient,
) -> None:
    bundle = await keyed_client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 500_000  # Swagger UI itself, not a stub
    assert (await keyed_client.get("/docs-assets/redoc.standalone.js")).status_code == 200
    assert (await keyed_client.get("/docs-assets/../v1/detect")).status_code in (401, 404)
    assert (await keyed_client.post("/v1/detect", json={})).status_code == 401

"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): whatever
a client sends, the answer is never a 5xx and the server keeps serving."""

from __future__ import annotations

import asyncio

import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from rexomni_server.app import create_app
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings

OUTPUT = "<|object_ref_start|>a<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>"


def _app() -> object:
    engine = ScriptedEngine(default_output=OUTPUT)
    asyncio.run(engine.start())
    return create_app(runtime=Runtime(Settings(allow_forced_output=True), engine=engine, model_label="scripted"))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])

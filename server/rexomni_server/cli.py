"""``rexomni-server``: serve, make-tiny-model, and the prompt/parse debug tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Coroutine, Sequence
from typing import Any

from rexomni_server.tasks import KEYPOINT_SETS, Task


def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags left out leave the environment's or the default)."""
    from rexomni_server.settings import Settings

    overrides = {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}
    for flag in ("http", "grpc"):
        if getattr(args, f"no_{flag}", False):
            overrides[f"{flag}_enabled"] = False
    return overrides


# Never a flag: a key on the command line is visible to every user of the machine (ps).
SECRET_SETTINGS = frozenset({"api_keys", "label_studio_api_key"})


def _add_setting_flags(serve: argparse.ArgumentParser) -> None:
    """A flag for every setting the hand-written ones above leave out (``--max-queue 10``,
    ``--enforce-eager``/``--no-enforce-eager``); the values are validated by Settings."""
    from rexomni_server.settings import Settings

    taken = {action.dest for action in serve._actions} | SECRET_SETTINGS | {"http_enabled", "grpc_enabled"}
    group = serve.add_argument_group("more settings (each also REXOMNI_<NAME>; see the README)")
    for name, field in Settings.model_fields.items():
        if name in taken:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=field.description)
        elif typing.get_origin(field.annotation) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(field.annotation), help=field.description)
        else:
            group.add_argument(flag, dest=name, metavar=name.upper(), help=field.description)


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """``main`` on uvloop (libuv's event loop: about a third less of the server's CPU per
    streamed token, see benchmarks/ceiling.py), or asyncio's own where uvloop is not built."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from rexomni_server.engines.loading import loads_still_running
    from rexomni_server.logs import configure_logging
    from rexomni_server.serve import serve
    from rexomni_server.settings import Settings, unknown_env_settings

    unknown = unknown_env_settings(os.environ)
    if unknown:
        raise ValueError(f"unknown settings in the environment: {', '.join(unknown)}")
    settings = Settings(**_settings_overrides(args))
    if os.environ.get("REXOMNI_API_KEY") and not (settings.api_keys.get_secret_value() or settings.api_keys_file):
        # The client's variable: a server given only it would run open, believing itself closed.
        raise ValueError(
            "REXOMNI_API_KEY is the client's setting; the server takes REXOMNI_API_KEYS (comma-separated) "
            "or REXOMNI_API_KEYS_FILE"
        )
    configure_logging(settings.log_level)
    status = 0
    try:
        status = run_event_loop(serve(settings))
    except OSError as exc:  # a port taken, a certificate unreadable
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    if loads_still_running():
        # Stopped while the model loaded: the load runs on in its thread, inside torch. The
        # interpreter's normal teardown under it can abort the process, so leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from rexomni_server.tiny import make_tiny_model

    path = make_tiny_model(args.directory)
    print(f"wrote a tiny RANDOM-WEIGHT Qwen2.5-VL checkpoint to {path}")
    return 0


def _params(args: argparse.Namespace) -> Any:
    from rexomni_server.schemas import DetectParams

    fields: dict[str, Any] = {"task": args.task, "categories": args.categories or ""}
    if args.keypoint_type:
        fields["keypoint_type"] = args.keypoint_type
    if getattr(args, "visual_prompt_boxes", None):
        fields["visual_prompt_boxes"] = json.loads(args.visual_prompt_boxes)
    return DetectParams.model_validate(fields)


def cmd_prompt(args: argparse.Namespace) -> int:
    from rexomni_server.prompts import task_text_for

    size = (args.width, args.height) if args.width and args.height else None
    sys.stdout.write(task_text_for(_params(args), size) + "\n")
    return 0


def cmd_parse(args: argparse.Namespace) -> int:
    from rexomni_server.parsing import parse_output
    from rexomni_server.tracking import to_schema

    detections, state = parse_output(Task(args.task), sys.stdin.read(), args.width, args.height)
    out = {
        "detections": [to_schema(d).model_dump() for d in detections],
        "truncated": state.truncated,
        "skipped": state.skipped,
    }
    json.dump(out, sys.stdout, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexomni-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the HTTP and gRPC servers (settings also from REXOMNI_* env)", allow_abbrev=False
    )
    serve.add_argument("--model", help="checkpoint path or hub id; 'tiny' = random tiny model")
    serve.add_argument("--engine", choices=["auto", "vllm", "transformers", "scripted"])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, dest="grpc_port", help="gRPC port (default 50051)")
    serve.add_argument("--no-http", action="store_true", dest="no_http", help="serve gRPC only")
    serve.add_argument("--no-grpc", action="store_true", dest="no_grpc", help="serve HTTP only")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    serve.add_argument("--max-concurrency", type=int, dest="max_concurrency")
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--tls-cert-file", dest="tls_cert_file", help="PEM certificate: serve HTTPS and gRPC over TLS")
    serve.add_argument("--tls-key-file", dest="tls_key_file", help="PEM private key of --tls-cert-file")
    serve.add_argument(
        "--api-keys-file",
        dest="api_keys_file",
        help="require an API key from this file (one per line); keys can also come "
        "from $REXOMNI_API_KEYS (comma-separated), never from a flag (ps would show them)",
    )
    serve.add_argument(
        "--fallback-to-tiny",
        action="store_true",
        default=None,
        help="serve the tiny random-weight model if the real one cannot be loaded (demos)",
    )
    serve.add_argument(
        "--allow-forced-output", action="store_true", default=None, help="accept options.forced_output (tests)"
    )
    _add_setting_flags(serve)
    serve.set_defaults(func=cmd_serve)

    tiny = sub.add_parser("make-tiny-model", help="write the tiny random checkpoint to DIR")
    tiny.add_argument("directory")
    tiny.set_defaults(func=cmd_make_tiny_model)

    for name, func, help_text in (
        ("prompt", cmd_prompt, "print the exact task text the model receives"),
        ("parse", cmd_parse, "parse a raw model output from stdin into detections"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--task", required=True, choices=[t.value for t in Task])
        p.add_argument("--categories", help="comma-separated")
        p.add_argument("--keypoint-type", dest="keypoint_type", choices=sorted(KEYPOINT_SETS))
        p.add_argument("--width", type=int, required=name == "parse")
        p.add_argument("--height", type=int, required=name == "parse")
        if name == "prompt":
            p.add_argument("--visual-prompt-boxes", dest="visual_prompt_boxes", help="JSON boxes")
        else:
            p.add_argument("--pretty", action="store_true")
        p.set_defaults(func=func)
    return parser


# The extra that brings a package a command may lack: the server's own (a client-only install
# has none of them), and the model packages (checkpoints, the transformers engine).
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "pydantic_settings", "prometheus_client"), "server"),
    **dict.fromkeys(("torch", "transformers", "tokenizers", "safetensors"), "transformers"),
}


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    from rexomni_server.errors import RexOmniError

    try:
        args = build_parser().parse_args(argv)
        result: int = args.func(args)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_PACKAGE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: this needs {exc.name}: pip install 'rexomni[{extra}]'", file=sys.stderr)
        return 1
    except (RexOmniError, ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())

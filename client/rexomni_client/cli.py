"""``rexomni``: the command-line client.

rexomni detect photo.jpg --categories person,car --annotate out.jpg
rexomni detect *.jpg --categories person --concurrency 16 > results.jsonl   # many images, batched
rexomni detect photo.jpg --categories person --stream          # one JSON line per detection
rexomni --grpc 127.0.0.1:50051 detect photo.jpg --categories person --stream
rexomni evaluate instances_val2017.json --images val2017 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import httpx
from pydantic import ValidationError

from rexomni_client.bulk import UNREACHABLE_ERRORS, detect_many
from rexomni_client.draw import annotate, annotation_problem
from rexomni_client.evaluation.cli import add_evaluate_parser, run_evaluate
from rexomni_client.grpc import AsyncRexOmniGrpcClient, RexOmniGrpcClient
from rexomni_client.http import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError, build_params
from rexomni_server.schemas import DetectionModel, DetectResult, validation_summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexomni", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=os.environ.get("REXOMNI_URL", "http://127.0.0.1:8000"), help="HTTP server base URL"
    )
    parser.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC endpoint instead of HTTP")
    parser.add_argument("--ca-file", help="CA certificate to trust for https:// and gRPC over TLS (private CAs)")
    parser.add_argument("--tls", action="store_true", help="gRPC over TLS with the system's trusted roots")
    parser.add_argument(
        "--retries",
        type=int,
        help="re-sends of a request refused as overloaded or loading (429/503, gRPC "
        "UNAVAILABLE), after the server's Retry-After (default 2; evaluate: 5)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REXOMNI_API_KEY"),
        help="the server's API key, if it requires one (default: $REXOMNI_API_KEY)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="detect in images: one JSON result, or one JSON line per image for several")
    detect.add_argument("images", nargs="+", metavar="image")
    detect.add_argument("--concurrency", type=int, default=8, help="several images: requests in flight (default 8)")
    detect.add_argument("--options", default="{}", help='more request options as JSON, e.g. {"priority": 10}')
    detect.add_argument("--task", default="detection")
    detect.add_argument("--categories", default="", help="comma-separated")
    detect.add_argument("--keypoint-type", dest="keypoint_type")
    detect.add_argument("--visual-prompt-boxes", dest="visual_prompt_boxes", help="JSON boxes")
    detect.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    detect.add_argument("--raw", action="store_true", help="include the raw model output")
    detect.add_argument("--stream", action="store_true", help="print each detection as it is decoded")
    detect.add_argument("--annotate", metavar="OUT", help="write the image with detections drawn")
    add_evaluate_parser(sub)
    return parser


def _client_settings(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(target, keyword arguments) shared by the sync and asyncio clients of the transport."""
    settings: dict[str, Any] = {
        "api_key": args.api_key,
        "ca_file": args.ca_file,
        "retries": 2 if args.retries is None else int(args.retries),
    }
    if args.grpc:
        return args.grpc, {**settings, "tls": args.tls}
    return args.url, settings


def _events(args: argparse.Namespace, kwargs: dict[str, Any]) -> Iterator[DetectionModel | DetectResult]:
    image = args.images[0]
    target, settings = _client_settings(args)
    client = RexOmniGrpcClient(target, **settings) if args.grpc else RexOmniClient(target, **settings)
    with client:
        if args.stream:
            yield from client.detect_stream(image, args.task, args.categories, **kwargs)
        else:
            yield client.detect(image, args.task, args.categories, **kwargs)


async def _detect_many(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    """One JSON line per image, as each finishes; exit status 1 when any image failed."""
    target, settings = _client_settings(args)
    client = AsyncRexOmniGrpcClient(target, **settings) if args.grpc else AsyncRexOmniClient(target, **settings)
    failed = 0
    async with client:
        answers = detect_many(client, args.images, args.task, args.categories, concurrency=args.concurrency, **kwargs)
        async for index, answer in answers:
            line: dict[str, Any] = {"image": args.images[index]}
            if isinstance(answer, DetectResult):
                line["result"] = answer.model_dump(mode="json")
            else:
                failed += 1
                line["error"] = _error_text(answer)
            print(json.dumps(line), flush=True)
    return 1 if failed else 0


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    if isinstance(exc, FileNotFoundError):
        return f"image not found: {exc.filename}"
    return str(exc)


def _request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = json.loads(args.options)
    if not isinstance(kwargs, dict):
        raise ValueError("--options must be a JSON object")
    if args.raw:
        kwargs["return_raw_output"] = True
    if args.keypoint_type:
        kwargs["keypoint_type"] = args.keypoint_type
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.visual_prompt_boxes:
        kwargs["visual_prompt_boxes"] = json.loads(args.visual_prompt_boxes)
    build_params(args.task, args.categories, **kwargs)  # the server's own validation, before the network
    return kwargs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        if args.grpc or args.tls:
            print("error: evaluate talks HTTP: give the server with --url (https:// for TLS)", file=sys.stderr)
            return 2
        return run_evaluate(args)
    try:
        return _detect(args)
    except UNREACHABLE_ERRORS as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:  # reached, but the connection failed
        print(f"error: the connection to {args.url} failed: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def _detect(args: argparse.Namespace) -> int:
    try:
        kwargs = _request_kwargs(args)
    except ValidationError as exc:
        print(f"error: bad request: {validation_summary(exc.errors())}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"error: bad request: {exc}", file=sys.stderr)
        return 2
    if len(args.images) > 1:
        if args.stream or args.annotate:
            print("error: --stream and --annotate take one image", file=sys.stderr)
            return 2
        return asyncio.run(_detect_many(args, kwargs))
    if args.annotate:
        problem = annotation_problem(args.annotate)
        if problem:  # found before the request, not after it
            print(f"error: --annotate {args.annotate}: {problem}", file=sys.stderr)
            return 2
    result: DetectResult | None = None
    try:
        for item in _events(args, kwargs):
            if isinstance(item, DetectResult):
                result = item
            else:
                print(json.dumps({"detection": item.model_dump()}), flush=True)
    except (RexOmniHTTPError, grpc.RpcError, OSError) as exc:
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    if result is None:  # the clients raise instead; kept so a silent failure is still said
        print("error: no result came back", file=sys.stderr)
        return 1
    print(result.model_dump_json(indent=None if args.stream else 2))
    if args.annotate:
        try:
            annotate(args.images[0], result, args.annotate)
        except (OSError, ValueError) as exc:
            print(f"error: --annotate {args.annotate}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

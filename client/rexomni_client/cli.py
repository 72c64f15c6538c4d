"""``rexomni``: the command-line client.

rexomni detect photo.jpg --categories person,car --annotate out.jpg
rexomni detect photo.jpg --categories person --stream          # one JSON line per detection
rexomni --grpc 127.0.0.1:50051 detect photo.jpg --categories person --stream
rexomni evaluate instances_val2017.json --images val2017 --concurrency 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from rexomni_client.evaluation.cli import add_evaluate_parser, run_evaluate
from rexomni_client.grpc import RexOmniGrpcClient
from rexomni_client.http import RexOmniClient, RexOmniHTTPError
from rexomni_server.schemas import DetectionModel, DetectResult


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
        help="re-sends of a request refused as overloaded or loading (429/503, RESOURCE_EXHAUSTED/"
        "UNAVAILABLE), after the server's Retry-After (default 2; evaluate: 5)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REXOMNI_API_KEY"),
        help="the server's API key, if it requires one (default: $REXOMNI_API_KEY)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="detect in one image and print the JSON result")
    detect.add_argument("image")
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


def _events(args: argparse.Namespace, kwargs: dict[str, Any]) -> Iterator[DetectionModel | DetectResult]:
    client: RexOmniClient | RexOmniGrpcClient
    if args.grpc:
        retries = 2 if args.retries is None else args.retries
        client = RexOmniGrpcClient(args.grpc, api_key=args.api_key, tls=args.tls, ca_file=args.ca_file, retries=retries)
    else:
        client = RexOmniClient(
            args.url, api_key=args.api_key, ca_file=args.ca_file, retries=2 if args.retries is None else args.retries
        )
    with client:
        if args.stream:
            yield from client.detect_stream(args.image, args.task, args.categories, **kwargs)
        else:
            yield client.detect(args.image, args.task, args.categories, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        return run_evaluate(args)
    kwargs: dict[str, Any] = {"return_raw_output": args.raw, "keypoint_type": args.keypoint_type}
    if args.max_new_tokens:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.visual_prompt_boxes:
        kwargs["visual_prompt_boxes"] = json.loads(args.visual_prompt_boxes)
    result: DetectResult | None = None
    try:
        for item in _events(args, kwargs):
            if isinstance(item, DetectResult):
                result = item
            else:
                print(json.dumps({"detection": item.model_dump()}), flush=True)
    except RexOmniHTTPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if result is None:
        return 1
    print(result.model_dump_json(indent=None if args.stream else 2))
    if args.annotate:
        from rexomni_client.draw import annotate

        annotate(args.image, result, args.annotate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``rexomni``: the command-line client.

rexomni detect photo.jpg --categories person,car --annotate out.jpg
rexomni detect *.jpg --categories person --concurrency 16 > results.jsonl   # many images, batched
rexomni detect *.jpg --categories person,car --format coco --output coco.json
rexomni detect *.jpg --categories person --format labelstudio --output tasks.json
rexomni detect photo.jpg --categories person --stream          # one JSON line per detection
rexomni detect aerial.jpg --categories car --tiling auto        # a large image, in tiles
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
from pathlib import Path
from typing import Any, TextIO

import grpc
import httpx
from pydantic import ValidationError

from rexomni_client.bulk import UNREACHABLE_ERRORS, detect_many
from rexomni_client.draw import annotate, annotation_problem
from rexomni_client.evaluation.cli import add_evaluate_parser, run_evaluate
from rexomni_client.export import to_coco, to_labelstudio
from rexomni_client.grpc import AsyncRexOmniGrpcClient, RexOmniGrpcClient
from rexomni_client.http import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError, build_params
from rexomni_client.progress import Progress, add_progress_argument
from rexomni_client.tiling_option import TilingConflict, add_tiling_argument, with_tiling
from rexomni_server.schemas import DetectionModel, DetectParams, DetectResult, validation_summary

# json: today's output (one JSON result for one image, one JSON line per image for several);
# the others write one document once every image is answered.
FORMATS = ("json", "coco", "labelstudio")


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
    add_tiling_argument(detect)
    detect.add_argument("--raw", action="store_true", help="include the raw model output")
    detect.add_argument("--stream", action="store_true", help="print each detection as it is decoded")
    detect.add_argument("--annotate", metavar="OUT", help="write the image with detections drawn")
    detect.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: the results as they are (default); coco: one COCO document; labelstudio: a Label Studio "
        "import file (tasks with predictions)",
    )
    detect.add_argument("--output", "-o", metavar="FILE", help="write the output there instead of to stdout")
    add_progress_argument(detect)
    studio = detect.add_argument_group("--format labelstudio")
    studio.add_argument("--from-name", default="label", help="the labelling config's control name (default label)")
    studio.add_argument("--to-name", default="image", help="the labelling config's image name (default image)")
    studio.add_argument(
        "--keypoint-from-name",
        default="keypoint",
        help="task keypoint: the KeyPointLabels control of the named keypoints (default keypoint)",
    )
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


async def _detect_many(
    args: argparse.Namespace, kwargs: dict[str, Any], out: TextIO | None
) -> tuple[int, list[tuple[str, DetectResult]]]:
    """(images failed, the answered (image, result) pairs in the order given). With ``out``
    (the json format) one JSON line per image is written there as each finishes, errors
    included; else the errors go to stderr, the results are returned for the document."""
    target, settings = _client_settings(args)
    client = AsyncRexOmniGrpcClient(target, **settings) if args.grpc else AsyncRexOmniClient(target, **settings)
    results: dict[int, DetectResult] = {}
    failed = 0
    with Progress(len(args.images), mode=args.progress, desc="detect") as progress:
        async with client:
            answers = detect_many(
                client, args.images, args.task, args.categories, concurrency=args.concurrency, **kwargs
            )
            async for index, answer in answers:
                image = args.images[index]
                if isinstance(answer, DetectResult):
                    results[index] = answer
                    if out is not None:
                        progress.write(json.dumps({"image": image, "result": answer.model_dump(mode="json")}), out)
                else:
                    failed += 1
                    if out is not None:
                        progress.write(json.dumps({"image": image, "error": _error_text(answer)}), out)
                    else:
                        progress.write(f"error: {image}: {_error_text(answer)}", sys.stderr)
                progress.update(failed=not isinstance(answer, DetectResult))
    return failed, [(args.images[i], results[i]) for i in sorted(results)]


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    if isinstance(exc, FileNotFoundError):
        return f"image not found: {exc.filename}"
    return str(exc)


def _request_kwargs(args: argparse.Namespace) -> tuple[dict[str, Any], DetectParams]:
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
    kwargs = with_tiling(kwargs, args.tiling)
    params = build_params(args.task, args.categories, **kwargs)  # the server's own validation, before the network
    return kwargs, params


def _output_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the output options, found before any request; None when nothing is."""
    if len(args.images) > 1 and (args.stream or args.annotate):
        return "--stream and --annotate take one image"
    if args.format != "json" and args.stream:
        return f"--stream prints detections as they come; --format {args.format} writes one document at the end"
    if args.output and not Path(args.output).parent.is_dir():
        return f"--output {args.output}: no such folder: {Path(args.output).parent}"
    if args.annotate:
        problem = annotation_problem(args.annotate)
        if problem:
            return f"--annotate {args.annotate}: {problem}"
    return None


def _document(args: argparse.Namespace, params: DetectParams, results: list[tuple[str, DetectResult]]) -> Any:
    if args.format == "coco":
        return to_coco(results, keypoint_type=params.keypoint_type)
    return to_labelstudio(
        results, from_name=args.from_name, to_name=args.to_name, keypoint_from_name=args.keypoint_from_name
    )


def _write_document(args: argparse.Namespace, document: Any) -> bool:
    """Writes the document to --output or stdout; False (said on stderr) when it could not be."""
    text = json.dumps(document) + "\n"
    if not args.output:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: --output {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


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
        kwargs, params = _request_kwargs(args)
    except TilingConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: bad request: {validation_summary(exc.errors())}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"error: bad request: {exc}", file=sys.stderr)
        return 2
    problem = _output_problem(args)
    if problem:  # found before the request, not after it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.format == "json" and args.output:
        try:
            out = open(args.output, "w", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            print(f"error: --output {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        with out:
            return _detect_to(args, kwargs, params, out)
    return _detect_to(args, kwargs, params, sys.stdout if args.format == "json" else None)


def _detect_to(args: argparse.Namespace, kwargs: dict[str, Any], params: DetectParams, out: TextIO | None) -> int:
    """``out``: where the json format goes; None for the document formats."""
    if len(args.images) > 1:
        failed, results = asyncio.run(_detect_many(args, kwargs, out))
        if out is None and not _write_document(args, _document(args, params, results)):
            return 1
        return 1 if failed else 0
    result: DetectResult | None = None
    try:
        for item in _events(args, kwargs):
            if isinstance(item, DetectResult):
                result = item
            elif out is not None:
                print(json.dumps({"detection": item.model_dump()}), file=out, flush=True)
    except (RexOmniHTTPError, grpc.RpcError, OSError) as exc:
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    if result is None:  # the clients raise instead; kept so a silent failure is still said
        print("error: no result came back", file=sys.stderr)
        return 1
    if out is not None:
        print(result.model_dump_json(indent=None if args.stream else 2), file=out, flush=True)
    elif not _write_document(args, _document(args, params, [(args.images[0], result)])):
        return 1
    if args.annotate:
        try:
            annotate(args.images[0], result, args.annotate, keypoint_type=params.keypoint_type)
        except (OSError, ValueError) as exc:
            print(f"error: --annotate {args.annotate}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

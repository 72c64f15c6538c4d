"""``rexomni``: the command-line client (``rexomni detect photo.jpg --categories person,car``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rexomni_client.http import RexOmniClient, RexOmniHTTPError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexomni", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="detect in one image and print the JSON result")
    detect.add_argument("image")
    detect.add_argument("--task", default="detection")
    detect.add_argument("--categories", default="", help="comma-separated")
    detect.add_argument("--keypoint-type", dest="keypoint_type")
    detect.add_argument("--visual-prompt-boxes", dest="visual_prompt_boxes", help="JSON boxes")
    detect.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    detect.add_argument("--raw", action="store_true", help="include the raw model output")
    detect.add_argument("--annotate", metavar="OUT", help="write the image with detections drawn")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options: dict[str, object] = {"return_raw_output": args.raw}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    boxes = json.loads(args.visual_prompt_boxes) if args.visual_prompt_boxes else None
    try:
        with RexOmniClient(args.url) as client:
            result = client.detect(
                args.image,
                args.task,
                args.categories,
                keypoint_type=args.keypoint_type,
                visual_prompt_boxes=boxes,
                **options,
            )
    except RexOmniHTTPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.model_dump_json(indent=2))
    if args.annotate:
        from rexomni_client.draw import annotate

        annotate(args.image, result, args.annotate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

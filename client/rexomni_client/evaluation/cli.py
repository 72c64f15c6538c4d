"""``rexomni evaluate``: accuracy of a running server on a COCO or Rex-Omni JSONL dataset.

rexomni evaluate instances_val2017.json --images val2017 --concurrency 32 --report coco.json
rexomni evaluate RefCOCOg_val.jsonl --images Rex-Omni-Eval --limit 500
rexomni evaluate COCO_point.jsonl --images Rex-Omni-Eval --task pointing
rexomni evaluate FSCD_test.jsonl --images Rex-Omni-Eval --task visual_prompting
rexomni evaluate aerial.jsonl --images aerial --tiling 1024:0.25   # large images, in tiles

Exit status: 0 when every image was scored; 1 when some failed (the table and --report still
cover the rest) or the server could not be reached; 2 for bad arguments or data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rexomni_client.evaluation.dataset import DatasetError, EvalSample, load_dataset
from rexomni_client.evaluation.report import category_table, report_dict, table
from rexomni_client.evaluation.runner import (
    EVALUATED_TASKS,
    EvalRun,
    Query,
    SavedAnswer,
    ServerUnreachable,
    check_task,
    evaluate,
    saved_answers,
)
from rexomni_client.http import AsyncRexOmniClient
from rexomni_client.progress import Progress, add_progress_argument
from rexomni_client.tiling_option import TilingConflict, add_tiling_argument, with_tiling
from rexomni_server.schemas import DetectOptions, DetectResult
from rexomni_server.tasks import Task


def add_evaluate_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="score the server on a COCO or Rex-Omni JSONL dataset (precision, recall, F1)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("annotations", type=Path, help="COCO instances .json or Rex-Omni .jsonl")
    parser.add_argument("--images", type=Path, help="image root (default: the annotation file's folder)")
    parser.add_argument("--format", default="auto", choices=["auto", "coco", "jsonl"])
    parser.add_argument("--task", default="detection", choices=[t.value for t in EVALUATED_TASKS])
    parser.add_argument(
        "--keypoint-type", choices=["person", "animal"], help="task keypoint: the keypoint set (default: the category)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--options", default="{}", help='request options as JSON, e.g. {"max_new_tokens": 2048}')
    add_tiling_argument(parser)
    parser.add_argument("--predictions", type=Path, help="write one JSON line per image (detections, errors)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --predictions: score the images already answered there, ask only the rest (appends)",
    )
    parser.add_argument("--report", type=Path, help="write the metrics as JSON")
    parser.add_argument(
        "--per-category", action="store_true", help="also score each category alone (table of the worst, JSON)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    add_progress_argument(parser)


async def _run(
    args: argparse.Namespace, samples: list[EvalSample], options: dict[str, Any], saved: dict[str, SavedAnswer]
) -> EvalRun:
    records = args.predictions.open("a" if args.resume else "w", encoding="utf-8") if args.predictions else None
    # The images asked for (not those scored from an earlier run's predictions).
    asked = len(samples) - len(saved.keys() & {s.sample_id for s in samples})
    progress = Progress(asked, mode=args.progress, desc="evaluate")

    def on_record(record: dict[str, Any]) -> None:
        if records is not None:
            records.write(json.dumps(record) + "\n")
            records.flush()  # a killed run keeps every image it finished (see --resume)
        progress.update(failed="error" in record)

    try:
        async with AsyncRexOmniClient(
            args.url,
            timeout=args.timeout,
            api_key=args.api_key,
            ca_file=args.ca_file,
            retries=5 if args.retries is None else args.retries,
        ) as client:

            async def detect(task: Task, query: Query, image: bytes) -> DetectResult:
                boxes = query.visual_prompt_boxes
                prompt: dict[str, Any] = {"visual_prompt_boxes": [list(b) for b in boxes]} if boxes else {}
                if args.keypoint_type:
                    prompt["keypoint_type"] = args.keypoint_type
                return await client.detect(image, task.value, list(query.categories), **prompt, **options)

            return await evaluate(
                samples, detect, args.task, concurrency=args.concurrency, on_record=on_record, saved=saved
            )
    finally:
        progress.close()
        if records is not None:
            records.close()


def _saved(args: argparse.Namespace) -> dict[str, SavedAnswer]:
    if not args.resume:
        return {}
    if args.predictions is None:
        raise DatasetError("--resume needs --predictions (the file to resume from and append to)")
    if not args.predictions.exists():
        return {}
    text = args.predictions.read_text(encoding="utf-8")
    saved = saved_answers(text)
    if not text.endswith("\n") and text:
        # A last line cut short by a killed run (its image is asked again) is dropped, so the
        # appended records start on a line of their own.
        with args.predictions.open("r+b") as f:
            f.truncate(len(text[: text.rfind("\n") + 1].encode("utf-8")))
    return saved


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.options)
        # The server's own validation, before any request.
        DetectOptions(**options)
        options = with_tiling(options, args.tiling)
        samples = load_dataset(args.annotations, args.images, args.format)
        saved = _saved(args)
    except json.JSONDecodeError as exc:
        print(f"error: --options is not JSON: {exc.msg}", file=sys.stderr)
        return 2
    except (ValidationError, TypeError) as exc:
        print(f"error: bad --options: {exc}", file=sys.stderr)
        return 2
    except TilingConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        samples = samples[: args.limit]
    if not samples:
        print("error: the dataset has no images to evaluate", file=sys.stderr)
        return 2
    try:
        check_task(args.task, samples)  # before --predictions is opened (and emptied)
        run = asyncio.run(_run(args, samples, options, saved))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerUnreachable as exc:
        print(f"error: server unreachable at {args.url}: {exc}", file=sys.stderr)
        return 1
    print(table(run))
    if args.per_category:
        print(category_table(run))
    if args.report:
        report = report_dict(run, str(args.annotations), per_category=args.per_category)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if run.summary.samples and not run.failed else 1

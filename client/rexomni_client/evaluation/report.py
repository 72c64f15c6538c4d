"""An evaluation run as a printed table and as a JSON report."""

from __future__ import annotations

from typing import Any

from rexomni_client.evaluation.runner import GUI_TASKS, EvalRun
from rexomni_client.evaluation.scoring import IOU_THRESHOLDS, POINT_KEY, Metric, iou_key
from rexomni_server.tasks import Task

SHOWN_THRESHOLDS = (0.5, 0.75, 0.95)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _metric(m: Metric) -> dict[str, float]:
    return {"precision": round(m.precision, 4), "recall": round(m.recall, 4), "f1": round(m.f1, 4)}


def asked_rate(run: EvalRun) -> float:
    """Images answered by the server per second (resumed ones took no time)."""
    return (run.summary.samples - run.resumed) / run.elapsed_s


def measure(run: EvalRun) -> str:
    """What the thresholds apply to: keypoint similarity for keypoints, box overlap otherwise."""
    return "OKS" if run.task is Task.KEYPOINT else "IoU"


def point_criterion(run: EvalRun) -> str:
    return "hit (accuracy)" if run.task in GUI_TASKS else "point in object"


def headline_key(run: EvalRun) -> str:
    """The criterion categories are ranked by: F1 at IoU 0.50, or point-in-object."""
    return POINT_KEY if POINT_KEY in run.summary.by_key else iou_key(0.5)


def report_dict(run: EvalRun, dataset: str, per_category: bool = False) -> dict[str, Any]:
    summary = run.summary
    report: dict[str, Any] = {
        "dataset": dataset,
        "task": run.task.value,
        "samples": run.samples,
        "scored": summary.samples,
        "failed": dict(sorted(run.failed.items())),
        "metrics": {key: _metric(m) for key, m in summary.by_key.items()},
        "measure": measure(run) if summary.mean else point_criterion(run),
        "mean_0.50_0.95": _metric(summary.mean) if summary.mean else None,
        "detections": run.detections,
        "resumed": run.resumed,
        "length_limited": run.length_limited,
        "elapsed_s": round(run.elapsed_s, 3),
        "images_per_s": round(asked_rate(run), 3) if run.elapsed_s > 0 else None,
        "latency_ms": {
            "p50": _percentile(run.latencies_ms, 0.5),
            "p95": _percentile(run.latencies_ms, 0.95),
        },
    }
    if per_category:
        key = headline_key(run)
        report["per_category"] = {
            category: {"images": s.samples, "criterion": key, **_metric(s.by_key[key])}
            for category, s in sorted(run.by_category.items())
            if key in s.by_key
        }
    return report


def category_table(run: EvalRun, most: int = 20) -> str:
    """The categories the model does worst on first."""
    key = headline_key(run)
    ranked = sorted((s.by_key[key].f1, c, s) for c, s in run.by_category.items() if key in s.by_key)
    criterion = point_criterion(run) if key == POINT_KEY else f"{measure(run)} {key}"
    heading = f"category (worst first, {criterion})"
    lines = [f"{heading:<40} {'images':>6} {'precision':>9} {'recall':>7} {'F1':>7}"]
    for _, category, s in ranked[:most]:
        m = s.by_key[key]
        lines.append(f"{category[:40]:<40} {s.samples:>6} {m.precision:>9.4f} {m.recall:>7.4f} {m.f1:>7.4f}")
    if len(ranked) > most:
        lines.append(f"... {len(ranked) - most} more in the JSON report")
    return "\n".join(lines)


def table(run: EvalRun) -> str:
    summary = run.summary
    rows: list[tuple[str, Metric]] = []
    if POINT_KEY in summary.by_key:
        rows.append((point_criterion(run), summary.by_key[POINT_KEY]))
    for threshold in SHOWN_THRESHOLDS:
        if iou_key(threshold) in summary.by_key:
            rows.append((f"{measure(run)} {threshold:.2f}", summary.by_key[iou_key(threshold)]))
    if summary.mean is not None:
        first, last = IOU_THRESHOLDS[0], IOU_THRESHOLDS[-1]
        rows.append((f"mean {measure(run)} {first:.2f}:{last:.2f}", summary.mean))
    lines = [f"{'criterion':<22} {'precision':>9} {'recall':>7} {'F1':>7}"]
    lines += [f"{name:<22} {m.precision:>9.4f} {m.recall:>7.4f} {m.f1:>7.4f}" for name, m in rows]
    rate = f"{asked_rate(run):.2f} images/s" if run.elapsed_s > 0 else "-"
    lines.append(
        f"task {run.task.value}: {summary.samples}/{run.samples} images scored, {len(run.failed)} failed, "
        f"{run.detections} detections, {run.elapsed_s:.1f} s ({rate})"
    )
    if run.resumed:
        lines.append(f"{run.resumed} images scored from the earlier predictions, not asked again")
    if run.length_limited:
        lines.append(f"{run.length_limited} answers hit max_new_tokens: raise it with --options for a fair recall")
    return "\n".join(lines)

"""Accuracy evaluation of a running server: datasets, scoring, a concurrent runner, reports."""

from rexomni_client.evaluation.dataset import DatasetError, EvalSample, load_dataset
from rexomni_client.evaluation.runner import EvalRun, ServerUnreachable, evaluate
from rexomni_client.evaluation.scoring import Prediction, SampleScore, Summary, Truth, score_boxes, score_points

__all__ = [
    "DatasetError",
    "EvalRun",
    "EvalSample",
    "Prediction",
    "SampleScore",
    "ServerUnreachable",
    "Summary",
    "Truth",
    "evaluate",
    "load_dataset",
    "score_boxes",
    "score_points",
]

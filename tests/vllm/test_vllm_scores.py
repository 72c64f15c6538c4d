"""Coordinate log-probabilities read from vLLM's outputs, flat (FlatLogprobs, what the engine
asks for where vLLM has it) or as a dict per position: the same values either way."""

from __future__ import annotations

from pathlib import Path

from vllm.logprobs import FlatLogprobs, Logprob

from rexomni_server.engines.vllm import VllmEngine
from tests.vllm.conftest import vllm_settings

COORDINATES = frozenset({501, 502})
# (sampled token, its log-probability) per position: text, coordinate, coordinate, text, coordinate
SAMPLED = [(7, -0.5), (501, -0.25), (502, -1.5), (9, -0.1), (501, -0.75)]


def engine() -> VllmEngine:
    engine = VllmEngine("unused", vllm_settings(Path("unused")))
    engine._coordinate_ids = COORDINATES
    return engine


def test_flat_and_per_position_logprobs_give_the_same_coordinate_values() -> None:
    per_position = [{token: Logprob(logprob=value, rank=1)} for token, value in SAMPLED]
    flat = FlatLogprobs()
    flat.extend(per_position)
    tokens = [token for token, _ in SAMPLED]
    expected = (-0.25, -1.5, -0.75)
    assert engine()._coordinate_logprobs(tokens, per_position) == expected
    assert engine()._coordinate_logprobs(tokens, flat) == expected


def test_no_logprobs_means_no_values() -> None:
    assert engine()._coordinate_logprobs([501], None) == ()
    assert engine()._coordinate_logprobs([501], FlatLogprobs()) == ()

"""``--tiling`` of ``rexomni detect`` and ``rexomni evaluate``: its values, and its clash with --options."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from rexomni_client.cli import build_parser
from rexomni_client.tiling_option import TilingConflict, parse_tiling, with_tiling
from rexomni_server.schemas import DetectOptions, TilingOptions


@pytest.mark.parametrize(
    ("text", "value", "tiling"),
    [
        ("auto", "auto", TilingOptions()),
        (" AUTO ", "auto", TilingOptions()),
        ("1024", {"tile_size": 1024}, TilingOptions(tile_size=1024)),
        ("1024:0.25", {"tile_size": 1024, "overlap": 0.25}, TilingOptions(tile_size=1024, overlap=0.25)),
        ("800:0", {"tile_size": 800, "overlap": 0.0}, TilingOptions(tile_size=800, overlap=0.0)),
        ("auto:0.5", {"overlap": 0.5}, TilingOptions(overlap=0.5)),
    ],
)
def test_good_values_become_the_tiling_option(text: str, value: Any, tiling: TilingOptions) -> None:
    assert parse_tiling(text) == value
    assert DetectOptions(tiling=value).tiling == tiling  # what the server will read


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "expected auto, SIZE or SIZE:OVERLAP"),
        ("big", "expected auto, SIZE or SIZE:OVERLAP"),
        ("1024.5", "expected auto, SIZE or SIZE:OVERLAP"),
        ("1024:", "the overlap after ':' is a number"),
        ("1024:quarter", "the overlap after ':' is a number"),
        ("1024:0.25:1", "the overlap after ':' is a number"),
        ("10", "tile_size: Input should be greater than or equal to"),  # under a patch
        ("1024:0.6", "overlap: Input should be less than or equal to 0.5"),
        ("1024:-0.1", "overlap: Input should be greater than or equal to 0"),
        ("1024:nan", "overlap:"),
    ],
)
def test_bad_values_are_refused_with_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(repr(text))}") as caught:
        parse_tiling(text)
    assert said in str(caught.value)


@pytest.mark.parametrize("command", [["detect", "x.jpg"], ["evaluate", "data.jsonl"]])
def test_both_commands_take_it_and_report_a_bad_value_as_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert build_parser().parse_args([*command, "--tiling", "1024:0.25"]).tiling == {"tile_size": 1024, "overlap": 0.25}
    assert build_parser().parse_args(command).tiling is None
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--tiling", "huge"])
    assert exited.value.code == 2
    assert "argument --tiling: 'huge': expected auto, SIZE or SIZE:OVERLAP" in capsys.readouterr().err


def test_with_tiling_adds_it_unless_options_have_one() -> None:
    options = {"priority": 3}
    assert with_tiling(options, None) is options
    assert with_tiling(options, "auto") == {"priority": 3, "tiling": "auto"} and options == {"priority": 3}
    with pytest.raises(TilingConflict, match="--tiling and --options tiling: give one"):
        with_tiling({"tiling": {"tile_size": 512}}, {"tile_size": 1024})

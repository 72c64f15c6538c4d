"""Splitting a forced output by category (fan-out): the regex's results, in linear time."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server.engines.forced import _phrase_groups, split_forced_by_category
from rexomni_server.parsing import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START
from rexomni_server.schemas import MAX_FORCED_OUTPUT_CHARS
from rexomni_server.vocabulary import END_MARKER

# The splitter's former implementation, the reference for its results: lazy quantifiers that
# backtrack in cubic time when groups never close (a 20 kB output took 13 s).
REFERENCE = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>.*?<\|box_end\|>", re.DOTALL)
# Hang guard only, never a speed claim: the splitter now takes milliseconds, the regex hours.
HANG_GUARD_S = 10


def reference_split(forced: str, categories: list[str]) -> list[str]:
    groups: dict[str, list[str]] = {c: [] for c in categories}
    for match in REFERENCE.finditer(forced):
        phrase = match.group(1).strip()
        if phrase in groups:
            groups[phrase].append(match.group(0))
    return [", ".join(groups[c]) for c in categories]


def group(phrase: str, coords: str = "<1><2><3><4>") -> str:
    return f"{OBJECT_REF_START}{phrase}{OBJECT_REF_END}{BOX_START}{coords}{BOX_END}"


def test_each_category_gets_its_groups_in_order() -> None:
    forced = ", ".join([group("cat"), group(" dog ", "<5><6>"), group("cat", "<7><8><9><10>")]) + END_MARKER
    assert split_forced_by_category(forced, ["dog", "cat", "bird"]) == [
        group(" dog ", "<5><6>"),
        f"{group('cat')}, {group('cat', '<7><8><9><10>')}",
        "",
    ]


# Grammar pieces, their fragments and junk: small texts that are well formed, cut short,
# nested, out of order or unclosed.
PIECES = st.sampled_from(
    [
        OBJECT_REF_START,
        OBJECT_REF_END,
        BOX_START,
        BOX_END,
        END_MARKER,
        "<|object_ref_",
        "end|>",
        "<|box_",
        "<|",
        "|>",
        "<12>",
        "<",
        ", ",
        "cat",
        " cat ",
        "Cat",
        "dog",
        "\n",
    ]
) | st.text(max_size=3)
CATEGORIES = st.lists(st.sampled_from(["cat", "Cat", "dog", "", "cat dog"]), max_size=4)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(PIECES, max_size=30), categories=CATEGORIES)
def test_same_results_as_the_regex(pieces: list[str], categories: list[str]) -> None:
    forced = "".join(pieces)
    expected = [(m.group(1), m.group(0)) for m in REFERENCE.finditer(forced)]
    assert list(_phrase_groups(forced)) == expected
    assert split_forced_by_category(forced, categories) == reference_split(forced, categories)


@pytest.mark.parametrize(
    "unit",
    [
        OBJECT_REF_START,  # starts, no end: quadratic for the regex (20 s and more)
        OBJECT_REF_START + "a" + OBJECT_REF_END,  # phrases, no box end: cubic for it (hours)
    ],
    ids=["starts-only", "no-box-end"],
)
def test_hostile_forced_outputs_split_without_hanging(unit: str) -> None:
    forced = unit * (MAX_FORCED_OUTPUT_CHARS // len(unit))  # as long as the schema lets one be
    # A child process, because a thread cannot be timed out here: a regex holds the GIL
    # until it returns.
    code = (
        "import sys; from rexomni_server.engines.forced import split_forced_by_category; "
        "print(split_forced_by_category(sys.stdin.read(), ['a']))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], input=forced, capture_output=True, text=True, timeout=HANG_GUARD_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"splitting a {len(forced)}-character forced output took over {HANG_GUARD_S} s")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['']\n"

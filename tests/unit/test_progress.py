"""The progress of runs over many images: tqdm's bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import sys

import pytest

from rexomni_client.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_the_bar_with_count_rate_and_failures() -> None:
    stream = Terminal()
    with Progress(4, stream=stream, desc="detect") as progress:
        assert progress.mode == "bar"
        for failed in (False, True, False, True):
            progress.update(failed=failed)
    shown = stream.getvalue()
    assert "\r" in shown  # redrawn in place
    final = shown.rsplit("\r", 1)[-1]
    assert final.startswith("detect: 100%") and "4/4" in final and "image/s" in final and "2 failed" in final


def test_elsewhere_a_line_every_tenth_and_at_the_end() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(20, stream=stream, clock=clock)
    assert progress.mode == "lines"
    for i in range(20):
        clock.now += 0.5
        progress.update(failed=i == 4)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # every 2 images (10%), the last one included
    assert lines[0] == "2/20 images, 2.0/s, 0 failed, 00:09 left"
    assert lines[2] == "6/20 images, 2.0/s, 1 failed, 00:07 left"
    assert lines[-1] == "20/20 images, 2.0/s, 1 failed"  # nothing left to wait for


def test_elsewhere_a_slow_run_says_something_every_10_s() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(1000, stream=stream, clock=clock, desc="evaluate")
    for _ in range(3):
        clock.now += 4
        progress.update()
    # 100 images (10%) have not finished, but 12 s have passed since the start: 997 left at 0.25/s.
    assert stream.getvalue().splitlines() == ["evaluate: 3/1000 images, 0.2/s, 0 failed, 1:06:28 left"]


def test_modes_can_be_chosen() -> None:
    terminal, plain = Terminal(), io.StringIO()
    with Progress(2, stream=terminal, mode="lines") as progress:
        progress.update()
    assert terminal.getvalue().startswith("1/2 images") and "\r" not in terminal.getvalue()
    with Progress(2, stream=plain, mode="bar") as progress:
        progress.update()
    assert "1/2" in plain.getvalue() and "|" in plain.getvalue()
    for stream in (Terminal(), io.StringIO()):
        with Progress(2, stream=stream, mode="off") as progress:
            progress.update()
        assert stream.getvalue() == ""
    silent = Terminal()
    with Progress(0, stream=silent) as progress:  # e.g. every image resumed from earlier predictions
        assert progress.mode == "off"
    assert silent.getvalue() == ""


def test_output_lines_go_around_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    stream = Terminal()
    with Progress(2, stream=stream) as progress:
        progress.update()
        progress.write('{"image": "a.jpg"}')
        progress.write("error: b.jpg: gone", sys.stderr)
    out, err = capsys.readouterr()
    assert out == '{"image": "a.jpg"}\n' and err == "error: b.jpg: gone\n"
    with Progress(2, stream=io.StringIO()) as progress:
        progress.write("line")
    assert capsys.readouterr().out == "line\n"

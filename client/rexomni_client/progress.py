"""Progress of a run over many images, on stderr: tqdm's bar (count, rate, time left, failures)
when stderr is a terminal, plain lines when it is a file or a pipe (a log keeps a line every
10% and at most every 10 s, not a redraw per image)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TextIO

from tqdm import tqdm

Mode = Literal["auto", "bar", "lines", "off"]
MODES: tuple[Mode, ...] = ("auto", "bar", "lines", "off")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="progress on stderr: a bar on a terminal, else a line every 10%% or 10 s (auto, the default), "
        "always the bar, always lines, or none",
    )


class Progress:
    """``update()`` once per finished image; ``write()`` for output printed meanwhile (so a
    line to the terminal does not land inside the bar). A context manager; nothing is shown
    for a run of no images."""

    def __init__(
        self,
        total: int,
        *,
        mode: Mode = "auto",
        stream: TextIO | None = None,
        desc: str | None = None,
        every_fraction: float = 0.1,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _isatty(self.stream) else "lines"
        self.mode: Mode = mode if total > 0 else "off"
        self._desc = desc
        self._step = max(1, math.ceil(total * every_fraction))
        self._every_s = every_s
        self._clock = clock
        self._start = self._last_line = clock()
        self._bar: Any = None
        if self.mode == "bar":
            self._bar = tqdm(
                total=total, desc=desc, unit="image", file=self.stream, dynamic_ncols=True, postfix="0 failed"
            )

    def update(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        if self._bar is not None:
            if failed:
                self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self._bar.update(1)
        elif self.mode == "lines":
            now = self._clock()
            if self.done == self.total or self.done % self._step == 0 or now - self._last_line >= self._every_s:
                self._last_line = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """``37/120 images, 4.2/s, 2 failed, 00:20 left``."""
        elapsed = (self._clock() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.done}/{self.total} images, {rate:.1f}/s, {self.failed} failed"
        if self.done < self.total and rate > 0:
            text += f", {tqdm.format_interval((self.total - self.done) / rate)} left"
        return f"{self._desc}: {text}" if self._desc else text

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Prints a line of output (stdout by default) around the bar."""
        out = file if file is not None else sys.stdout
        if self._bar is not None:
            tqdm.write(text, file=out)
        else:
            print(text, file=out)
        out.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False

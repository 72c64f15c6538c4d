"""Helpers shared by the tests (fixtures live in conftest.py; helpers are imported from here)."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Callable

from PIL import Image


def image_bytes(width: int = 640, height: int = 480, fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    colour: object = (30, 120, 200) if mode in ("RGB", "RGBA") else 128
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, fmt, **save)  # type: ignore[arg-type]
    return buf.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about width * height * 3."""
    import random

    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout_s`` (a hang guard, not
    a speed claim)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)

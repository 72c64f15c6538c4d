"""Coordinate bins: Rex-Omni writes every coordinate as one of 1000 tokens ``<0>``..``<999>``."""

from __future__ import annotations

from rexomni_server.vocabulary import MAX_BIN


def to_bin(value: float, size: int) -> int:
    """Pixel coordinate -> bin, exactly as the reference encodes visual prompts."""
    normalized = max(0.0, min(1.0, value / size))
    return max(0, min(MAX_BIN, int(normalized * MAX_BIN)))


def from_bin(bin_index: int, size: int) -> float:
    """Bin -> pixel coordinate in the ORIGINAL image (not the resized one the model saw)."""
    return bin_index / MAX_BIN * size


def bin_token(bin_index: int) -> str:
    return f"<{bin_index}>"

"""Forced outputs: make a (random-weight) model write an exact token sequence.

A test and benchmark facility: the service rejects ``forced_output`` unless the server was
started with ``allow_forced_output``. Decode cost does not depend on which token wins, so a
forced run times the same work as a real one.
"""

from __future__ import annotations

import re
from typing import Any


def forced_token_ids(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


class ForcedOutputLogitsProcessor:
    """transformers LogitsProcessor: allow only the next forced token, then end-of-turn."""

    def __init__(self, forced_ids: list[int], prompt_length: int, eos_id: int) -> None:
        self._forced = forced_ids
        self._prompt_length = prompt_length
        self._eos = eos_id

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self._prompt_length
        allowed = self._forced[step] if step < len(self._forced) else self._eos
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[:, allowed] = 0.0
        return forced


_GROUP = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>.*?<\|box_end\|>", re.DOTALL)


def split_forced_by_category(forced: str, categories: list[str]) -> list[str]:
    """Split a multi-category forced output into one forced output per category (fan-out).

    Each phrase group goes to the request of the category it names, in order; a category
    with no group gets an empty output (the model ends at once)."""
    groups: dict[str, list[str]] = {c: [] for c in categories}
    for match in _GROUP.finditer(forced):
        phrase = match.group(1).strip()
        if phrase in groups:
            groups[phrase].append(match.group(0))
    return [", ".join(groups[c]) for c in categories]

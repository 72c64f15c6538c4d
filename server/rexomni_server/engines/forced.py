"""Forced outputs: make a (random-weight) model write an exact token sequence.

A test and benchmark facility: the service rejects ``forced_output`` unless the server was
started with ``allow_forced_output``. Decode cost does not depend on which token wins, so a
forced run times the same work as a real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rexomni_server.parsing import BOX_END, OBJECT_REF_END, OBJECT_REF_START


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


def _phrase_groups(forced: str) -> Iterator[tuple[str, str]]:
    """(phrase, whole group) for each ``<|object_ref_start|>PHRASE<|object_ref_end|>...<|box_end|>``,
    in order: a phrase ends at the first end marker after its start, a group at the first box end
    after that.

    A scan with ``str.find``, linear in the text's length: forced outputs come from clients, and
    the equivalent regex (lazy quantifiers) took cubic time on groups that never close."""
    pos = 0
    while True:
        # A start with no complete group after it leaves none for any later start either (their
        # end markers would be its own), so the first failure ends the scan.
        start = forced.find(OBJECT_REF_START, pos)
        if start == -1:
            return
        phrase_start = start + len(OBJECT_REF_START)
        phrase_end = forced.find(OBJECT_REF_END, phrase_start)
        if phrase_end == -1:
            return
        box_end = forced.find(BOX_END, phrase_end + len(OBJECT_REF_END))
        if box_end == -1:
            return
        pos = box_end + len(BOX_END)
        yield forced[phrase_start:phrase_end], forced[start:pos]


def split_forced_by_category(forced: str, categories: list[str]) -> list[str]:
    """Split a multi-category forced output into one forced output per category (fan-out).

    Each phrase group goes to the request of the category it names, in order; a category
    with no group gets an empty output (the model ends at once)."""
    groups: dict[str, list[str]] = {c: [] for c in categories}
    for phrase, group in _phrase_groups(forced):
        named = groups.get(phrase.strip())
        if named is not None:
            named.append(group)
    return [", ".join(groups[c]) for c in categories]

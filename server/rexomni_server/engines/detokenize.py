"""Incremental detokenisation: text deltas from token ids, never splitting a UTF-8 character.

Decoding the whole output after every token costs O(n^2) over a 4096-token answer; this keeps
a small window instead (the prefix/read offset scheme text-generation servers use).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_ids: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_ids
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text

    def add(self, token_ids: list[int]) -> str:
        self._ids.extend(t for t in token_ids if t not in self._skip)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""  # an incomplete character: wait for the next token

    def flush(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]

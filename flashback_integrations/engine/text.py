"""Incremental detokenisation with exact stop-string cuts, for streaming and for the final text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StreamingText:
    """Turns generated ids into text deltas; holds back any tail that could begin a stop string.

    The concatenated deltas always equal the final ``text``, which ends right before the first
    stop string that appears anywhere in the decoded output (even across token boundaries).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] | None = None) -> None:
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are decoded for context only
        self._read = 0  # ids before this are already in self._text
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that may be shown now."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back once generation is over."""
        if not self.stopped and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            self._text += after[len(before) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            start = max(0, self._emitted - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                cut = min(hits)
                self._text = self._text[:cut]
                self.stopped = True
                final = True
        safe = len(self._text) if final else len(self._text) - self._held_back()
        delta = self._text[self._emitted : max(safe, self._emitted)]
        self._emitted += len(delta)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    @property
    def text(self) -> str:
        return self._text

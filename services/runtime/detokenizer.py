"""Incremental detokenization and stop strings.

Byte-level BPE tokens need their neighbours to decode (a multi-byte character can span
tokens; a leading space depends on context), so each step decodes a short window of
recent tokens and keeps only what the window adds, holding back a trailing partial
character. With stop strings, the last `len(longest stop) - 1` characters are held back
from the stream until they cannot begin a stop string, so a stop is never half-sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.runtime.tokenizer import Tokenizer

_PARTIAL = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut before a stop string
        self.stopped_by: str | None = None
        self._emitted = 0  # characters of `text` already returned
        self._prefix = 0  # window start: tokens before it are decoded for good
        self._read = 0  # tokens up to here are in `text`

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now safe to stream."""
        if self.stopped_by is not None:
            return ""
        self.ids.extend(token_ids)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        window = self.tokenizer.decode(self.ids[self._prefix:])
        if window.endswith(_PARTIAL) or len(window) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        searched_from = max(0, len(self.text) - self._holdback)
        self.text += window[len(before):]
        if self.stop:
            hits = [(self.text.find(s, searched_from), s) for s in self.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, self.stopped_by = min(hits)
                self.text = self.text[:at]
                return self.flush()
        return self._emit(self._holdback)

    def flush(self) -> str:
        """The held-back tail, once the request has finished."""
        return self._emit(0)

    def _emit(self, hold: int) -> str:
        end = max(self._emitted, len(self.text) - hold)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

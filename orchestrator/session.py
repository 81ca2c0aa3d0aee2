"""A request running on this orchestrator replica: its tokens so far and everyone following them.

The request's own `Generate` stream, a retry with the same client request id and a `Resume`
all read the same session from the index they need, so none of them repeats or skips a token.
Tokens reach a session only after the state store holds them (see lifecycle.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Delta:
    index: int  # output position of token_ids[0]
    token_ids: tuple[int, ...]
    text: str


@dataclass
class Ending:
    finish_reason: str  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclass
class RequestSession:
    request_id: str
    prompt_tokens: int
    started_at: float = field(default_factory=time.monotonic)
    deltas: list[Delta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # every output token so far
    cached_prompt_tokens: int = 0
    first_token_at: float | None = None
    ending: Ending | None = None
    followers: int = 0  # client streams reading it now
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_to_first_token_s(self) -> float:
        return 0.0 if self.first_token_at is None else self.first_token_at - self.started_at

    async def push(self, token_ids: list[int], text: str) -> None:
        if token_ids or text:
            self.deltas.append(Delta(self.num_tokens, tuple(token_ids), text))
            self.token_ids += token_ids
            if self.first_token_at is None and token_ids:
                self.first_token_at = time.monotonic()
        async with self._changed:
            self._changed.notify_all()

    async def end(self, finish_reason: str, error: str | None = None) -> None:
        if self.ending is None:
            self.ending = Ending(finish_reason, error)
        async with self._changed:
            self._changed.notify_all()

    async def follow(self, from_index: int = 0) -> AsyncIterator[Delta | Ending]:
        """The deltas from output token `from_index` on (the first one cut to start there), then the
        ending. Deltas that piled up while the reader was busy come coalesced into one."""
        self.followers += 1
        try:
            seen = 0  # deltas already looked at
            while True:
                # Read before draining: every delta is pushed before the ending, so once this is set
                # the drain below sees them all. (Read after, a push and the ending arriving while
                # the reader was away at a yield would end the stream without that push's tokens.)
                ending = self.ending
                ready: list[Delta] = []
                while seen < len(self.deltas):
                    d = self.deltas[seen]
                    seen += 1
                    if d.index < from_index:
                        if d.index + len(d.token_ids) <= from_index:
                            continue  # the reader has all of it (or it is text of tokens the reader has)
                        # Cut: text cannot be split by token, so it is dropped; the ids are the record.
                        d = Delta(from_index, d.token_ids[from_index - d.index:], "")
                    ready.append(d)
                if ready:  # a reader that fell behind (a loaded server, a slow client) gets one chunk
                    yield Delta(ready[0].index, tuple(t for d in ready for t in d.token_ids),
                                "".join(d.text for d in ready))
                if ending is not None:
                    yield ending
                    return
                async with self._changed:
                    if seen == len(self.deltas) and self.ending is None:
                        await self._changed.wait()
        finally:
            self.followers -= 1

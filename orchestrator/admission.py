"""Admission control: how many requests run at once, and how many KV tokens they may claim.

A request claims `prompt + max_tokens` tokens of the KV budget (the serving workers' KV capacity
times `kv_overcommit`) while it runs, so admitted requests do not push each other out of the
cache. One that does not fit now waits in a queue ordered by priority, then arrival; a full
queue, or a request larger than the whole budget, is refused (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from services.runtime.errors import ResourceExhaustedError


@dataclass(frozen=True)
class AdmissionConfig:
    max_running_requests: int = 64
    """Requests running on this replica at once."""
    max_queued_requests: int = 256
    """Requests waiting for room; one more is refused."""
    kv_overcommit: float = 1.0
    """KV budget = the serving workers' KV capacity (tokens) times this. Above 1, the engines
    preempt (recompute) when claims outgrow the cache; below 1, room is kept for prefix caching."""


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]  # (-priority, arrival): higher priority first, then first come
    tokens: int = field(compare=False)
    ready: asyncio.Future = field(compare=False)


class Admission:
    def __init__(self, config: AdmissionConfig = AdmissionConfig(), kv_capacity_tokens: int | None = None) -> None:
        self.config = config
        self.capacity: int | None = kv_capacity_tokens
        self.running = 0
        self.claimed = 0  # KV tokens claimed by running requests
        self._queue: list[_Waiter] = []
        self._arrivals = itertools.count()

    @property
    def budget(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * self.config.kv_overcommit)

    @property
    def queued(self) -> int:
        return sum(1 for w in self._queue if not w.ready.done())

    def set_capacity(self, kv_capacity_tokens: int) -> None:
        """The serving pools changed size (scaling, a lost worker): admit against the new budget."""
        self.capacity = kv_capacity_tokens
        self._wake()

    def check(self, tokens: int) -> None:
        """Raise ResourceExhaustedError now if a request of `tokens` could not even wait for room."""
        budget = self.budget
        if budget is not None and tokens > budget:
            raise ResourceExhaustedError(f"the request may need {tokens} KV tokens (prompt + max_tokens); this "
                                         f"server's budget is {budget}: lower max_tokens")
        would_wait = self.queued > 0 or not self._fits(tokens)
        if would_wait and self.queued >= self.config.max_queued_requests:
            raise ResourceExhaustedError(f"{self.running} requests run and {self.queued} are queued, the most this "
                                         "server holds; retry later")

    async def admit(self, tokens: int, priority: int = 0) -> None:
        """Wait until the request may run (it then holds its claim until `release`). Cancelling the
        waiting task (deadline, client gone) takes it out of the queue."""
        self.check(tokens)
        if self.queued == 0 and self._fits(tokens):
            self._claim(tokens)
            return
        waiter = _Waiter((-priority, next(self._arrivals)), tokens, asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, waiter)
        try:
            await waiter.ready
        except BaseException:
            if waiter.ready.done() and not waiter.ready.cancelled():
                self.release(tokens)  # admitted and abandoned in the same moment
            else:
                waiter.ready.cancel()
                self._wake()
            raise

    def release(self, tokens: int) -> None:
        self.running -= 1
        self.claimed -= tokens
        self._wake()

    def _fits(self, tokens: int) -> bool:
        budget = self.budget
        return self.running < self.config.max_running_requests and (budget is None or self.claimed + tokens <= budget)

    def _claim(self, tokens: int) -> None:
        self.running += 1
        self.claimed += tokens

    def _wake(self) -> None:
        """Admit waiters in rank order while the first fits (no overtaking: big requests do not starve)."""
        while self._queue:
            head = self._queue[0]
            if head.ready.done():  # cancelled while waiting
                heapq.heappop(self._queue)
                continue
            if not self._fits(head.tokens):
                return
            heapq.heappop(self._queue)
            self._claim(head.tokens)
            head.ready.set_result(None)

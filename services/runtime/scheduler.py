"""Continuous batching under a token budget, with one rule for prefill and decode.

Each step, every scheduled request's computed-token count catches up towards its token
count (prompt + outputs) plus its draft: a new prompt advances by a chunk (chunked
prefill), a decoding request by one token, or by its root and draft tree when speculating.
Running requests go first, in admission order; waiting requests
are admitted while the budget, the batch size and free blocks allow. When a running
request needs a block and none is free, the most recently admitted running request is
preempted: its blocks are freed and it will be recomputed from its tokens (prompt and
outputs so far), which the keyed sampler turns into the same continuation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.runtime.block_manager import BlockManager
from services.runtime.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """Token budget of one forward pass (prefill chunks plus decodes)."""
    max_num_seqs: int = 64
    """Most requests in one batch."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class ScheduledBatch:
    """What one forward pass computes: for each request, how many of its next tokens."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            behind = req.num_tokens - req.num_computed_tokens
            if req.draft is not None and behind + len(req.draft) > budget:
                req.draft = None  # no room for the tree this step: decode plainly
            n = min(behind + (len(req.draft) if req.draft else 0), budget)
            while not self.blocks.allocate(req.block_table, req.num_computed_tokens + n):
                if req.draft is not None:  # give up speculation before preempting anyone
                    req.draft = None
                    n = min(behind, budget)
                    continue
                victim = self.running.pop()
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if batch.preempted:
                break  # memory is short this step: let the running requests drain first
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _admit(self, req: Request, budget: int) -> int | None:
        """Take blocks for a waiting request's first chunk; None if they do not fit."""
        if req.block_table:  # already holds blocks (cannot happen after preemption, which frees them)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            return n if self.blocks.allocate(req.block_table, req.num_computed_tokens + n) else None
        # Size the first chunk as if nothing were cached, then let cache hits shorten it.
        cached = self.blocks.allocate_prompt(
            req.block_table, req.block_hashes, req.token_ids,
            num_slots=min(req.num_tokens, budget),
        )
        if cached is None:
            return None
        if req.num_preemptions == 0:
            req.num_cached_tokens = cached
        req.num_computed_tokens = cached
        n = min(req.num_tokens - cached, budget)
        if not self.blocks.allocate(req.block_table, cached + n):
            self.blocks.free(req.block_table)
            req.block_hashes.clear()
            req.num_computed_tokens = 0
            return None
        return n

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.blocks.free(req.block_table)
        req.reset_for_recompute()
        self.waiting.appendleft(req)
        batch.preempted.append(req)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and free its blocks at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_table)
        req.block_hashes.clear()

"""Prefix-cache-aware routing: send a prompt where its prefix's KV probably still is.

Each worker's prefix cache keys full blocks by a hash chain over their tokens (block_manager.py).
The router keeps, per worker, the same chains of the prompts it sent there recently (an LRU of
bounded size: a guess at what the worker still caches, never a promise) and picks the worker
holding the longest prefix of a new prompt, unless that worker has more than
`max_extra_queued_tokens` more work queued than the least loaded one: a cache hit saves
prefill, but not at any price in waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.workers.load import WorkerLoad


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hash chain of the full blocks of `token_ids` (the shape of the block manager's chain)."""
    chain, h = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start:start + block_size])))
        chain.append(h)
    return chain


@dataclass
class PrefixRouter:
    block_size: int
    blocks_per_worker: int = 8192
    """Block hashes remembered per worker (about its KV cache's size)."""
    max_extra_queued_tokens: int = 2048

    def __post_init__(self) -> None:
        self._seen: dict[str, OrderedDict[int, None]] = {}

    def choose(self, token_ids: Sequence[int], loads: Sequence[WorkerLoad]) -> WorkerLoad:
        """The worker to send `token_ids` to, from the candidates' current loads."""
        least = min(loads, key=WorkerLoad.sort_key)
        chain = block_hashes(token_ids, self.block_size)
        best, best_hit = least, self.matched_blocks(least.worker_id, chain)
        for load in loads:
            hit = self.matched_blocks(load.worker_id, chain)
            if hit > best_hit and load.queued_tokens - least.queued_tokens <= self.max_extra_queued_tokens:
                best, best_hit = load, hit
        return best

    def matched_blocks(self, worker_id: str, chain: Sequence[int]) -> int:
        seen = self._seen.get(worker_id)
        n = 0
        while seen is not None and n < len(chain) and chain[n] in seen:
            n += 1
        return n

    def record(self, worker_id: str, token_ids: Sequence[int]) -> None:
        seen = self._seen.setdefault(worker_id, OrderedDict())
        for h in block_hashes(token_ids, self.block_size):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.blocks_per_worker:
            seen.popitem(last=False)

    def remembered(self, worker_id: str) -> int:
        """Block hashes kept for the worker."""
        return len(self._seen.get(worker_id, ()))

    def forget(self, worker_id: str) -> None:
        self._seen.pop(worker_id, None)

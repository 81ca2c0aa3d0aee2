"""Which KV blocks each request holds: reference counts, a free list, prefix caching.

Pure bookkeeping, no tensors. A request's block table is a list of block ids; slot `j`
of the request lives in block `table[j // block_size]` at offset `j % block_size`.

Prefix caching: a block full of computed tokens gets the hash of (previous block's hash,
its tokens), so equal prefixes have equal hash chains. A new request whose prompt starts
with a cached chain takes those blocks (ref count + 1) instead of computing them. Blocks
whose count drops to 0 keep their content and hash in an LRU free list; they are reused
for new content only when no never-used block is left, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # content of a hashed block, checked on a hit (no collision trust)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from the cache


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {self.num_blocks}, {self.block_size}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    # --- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    # --- allocation ------------------------------------------------------------------------------
    def allocate(self, table: list[int], num_slots: int) -> bool:
        """Grow `table` to cover `num_slots` slots. All or nothing: False leaves it unchanged."""
        need = self.blocks_for(num_slots) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._take_free())
        return True

    def allocate_prompt(self, table: list[int], block_hashes: list[int], token_ids: Sequence[int],
                        num_slots: int) -> int | None:
        """First allocation of a request: reuse the longest cached prefix of `token_ids`, then
        fresh blocks up to `num_slots`. Returns the number of tokens served from the cache, or
        None (nothing changed) if the blocks do not fit. At least one token is left to compute,
        since the last prompt token's logits are needed."""
        assert not table, "allocate_prompt is for a request that holds no blocks"
        hits, hashes = self._match_prefix(token_ids) if self.enable_prefix_caching else ([], [])
        fresh = max(0, self.blocks_for(num_slots) - len(hits))
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh + revived > len(self._free):
            return None
        for b in hits:
            self._ref(b)
        table.extend(hits)
        block_hashes.extend(hashes)
        for _ in range(fresh):
            table.append(self._take_free())
        self.stats.queries += len(token_ids)
        self.stats.hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def free(self, table: list[int]) -> None:
        """Drop the request's references; tail blocks first, so they are evicted before the prefix."""
        for b in reversed(table):
            self._unref(b)
        table.clear()

    def truncate(self, table: list[int], num_slots: int) -> None:
        """Release blocks beyond the first `num_slots` slots (rejected speculative slots)."""
        keep = self.blocks_for(num_slots)
        while len(table) > keep:
            self._unref(table.pop())

    def commit_full_blocks(self, table: Sequence[int], block_hashes: list[int], token_ids: Sequence[int],
                           num_computed: int) -> None:
        """Hash every block that is now full of computed tokens, making it findable by later prompts."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(block_hashes), num_computed // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((block_hashes[-1] if block_hashes else 0, chunk))
            block_hashes.append(h)
            block = self.blocks[table[i]]
            if block.hash is None and h not in self._cached:
                block.hash, block.token_ids = h, chunk
                self._cached[h] = block.block_id

    # --- internals -------------------------------------------------------------------------------
    def _match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        bs = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        prev = 0
        for i in range((len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((prev, chunk))
            b = self._cached.get(h)
            if b is None or self.blocks[b].token_ids != chunk:
                break
            hits.append(b)
            hashes.append(h)
            prev = h
        return hits, hashes

    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:  # evict its cached content
            if self._cached.get(block.hash) == b:
                del self._cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return b

    def _ref(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count == 0:
            del self._free[b]
        block.ref_count += 1

    def _unref(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {b} freed more times than it was taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[b] = None

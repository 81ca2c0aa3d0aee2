"""Prefix-cache-aware routing: longest remembered prefix wins, within a load margin."""

from __future__ import annotations

from services.cluster.prefix_router import PrefixRouter, block_hashes
from services.workers.load import WorkerLoad


def _load(worker: str, queued: int = 0) -> WorkerLoad:
    return WorkerLoad(worker, "verify", running=0, waiting=0, queued_tokens=queued, used_blocks=0, free_blocks=100)


def test_the_worker_with_the_longest_prefix_wins_within_the_load_margin():
    router = PrefixRouter(block_size=4, max_extra_queued_tokens=100)
    shared = list(range(40))
    router.record("a", shared[:8])
    router.record("b", shared[:24])
    loads = [_load("a"), _load("b", queued=50), _load("c")]
    assert router.choose(shared + [99, 98], loads).worker_id == "b"  # 6 blocks beat 2
    assert router.matched_blocks("b", block_hashes(shared, 4)) == 6
    busy = [_load("a"), _load("b", queued=500), _load("c")]
    assert router.choose(shared, busy).worker_id == "a"  # b is too busy; a still holds 2 blocks
    assert router.choose([7, 7, 7, 7, 7], loads).worker_id == "a"  # no prefix anywhere: least loaded


def test_memory_per_worker_is_bounded_and_forgotten_with_the_worker():
    router = PrefixRouter(block_size=2, blocks_per_worker=3)
    router.record("a", list(range(20)))  # 10 blocks: the oldest 7 are forgotten
    chain = block_hashes(list(range(20)), 2)
    assert router.matched_blocks("a", chain) == 0  # the chain's head is gone, so no prefix matches
    assert router.remembered("a") == 3
    router.forget("a")
    assert router.remembered("a") == 0

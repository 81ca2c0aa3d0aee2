from __future__ import annotations

import pytest

from services.runtime.block_manager import BlockManager


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.allocate(table, 9) and len(table) == 3
    assert not bm.allocate(table, 21)  # would need 6 blocks
    assert len(table) == 3 and bm.num_free_blocks == 1
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 4


def test_prefix_chain_is_shared_and_ref_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(13))
    a_table, a_hashes = [], []
    assert bm.allocate_prompt(a_table, a_hashes, tokens, 13) == 0
    bm.commit_full_blocks(a_table, a_hashes, tokens, 13)
    assert len(a_hashes) == 3

    b_table, b_hashes = [], []
    cached = bm.allocate_prompt(b_table, b_hashes, tokens[:12] + [99, 100], 14)
    assert cached == 12 and b_table[:3] == a_table[:3] and b_table[3] != a_table[3]
    assert [bm.blocks[i].ref_count for i in a_table[:3]] == [2, 2, 2]
    assert bm.stats.hits == 12

    bm.free(a_table)
    bm.free(b_table)
    assert bm.num_free_blocks == 16


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    t, h = [], []
    bm.allocate_prompt(t, h, tokens, 8)
    bm.commit_full_blocks(t, h, tokens, 8)
    bm.free(t)
    t2, h2 = [], []
    assert bm.allocate_prompt(t2, h2, tokens, 8) == 4  # the second block holds the last token
    bm.free(t2)


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    t, h = [], []
    bm.allocate_prompt(t, h, [1, 2, 3, 4, 5], 5)
    bm.commit_full_blocks(t, h, [1, 2, 3, 4, 5], 4)
    bm.free(t)
    t2, h2 = [], []
    assert bm.allocate_prompt(t2, h2, [1, 2, 3, 4, 6], 5) == 4  # revived from the free list
    bm.free(t2)
    # Fill the whole pool with other content: the cached blocks are evicted.
    t3: list[int] = []
    assert bm.allocate(t3, 8)
    bm.free(t3)
    t4, h4 = [], []
    assert bm.allocate_prompt(t4, h4, [1, 2, 3, 4, 6], 5) == 0
    bm.free(t4)


def test_truncate_releases_tail_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    t: list[int] = []
    bm.allocate(t, 20)
    bm.truncate(t, 9)
    assert len(t) == 3 and bm.num_free_blocks == 5
    bm.free(t)


def test_double_free_is_an_error():
    bm = BlockManager(num_blocks=2, block_size=2)
    t: list[int] = []
    bm.allocate(t, 2)
    copy = list(t)
    bm.free(t)
    with pytest.raises(RuntimeError, match="freed more times"):
        bm.free(copy)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    for _ in range(2):
        t, h = [], []
        assert bm.allocate_prompt(t, h, [1, 2, 3, 4, 5], 5) == 0
        bm.commit_full_blocks(t, h, [1, 2, 3, 4, 5], 5)
        bm.free(t)

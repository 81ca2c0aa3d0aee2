"""Attention groups: the batch split into padded calls by new-token count, optimally, and
exactly as if every sequence ran alone."""

from __future__ import annotations

import itertools
import random

import torch

from services.runtime.attention_groups import plan_groups
from services.runtime.kv_cache import KVCache
from services.runtime.model_runner import ModelRunner, SeqInput
from tests.unit.test_tree_verify import ancestors_mask, depth


def padded_cost(groups: list[list[int]], q_lens: list[int], kv_lens: list[int], overhead: int) -> int:
    return sum(len(g) * max(q_lens[i] for i in g) * max(kv_lens[i] for i in g) + overhead for g in groups)


def brute_force_cost(q_lens: list[int], kv_lens: list[int], overhead: int) -> int:
    """Every way to cut the distinct new-token counts, sorted, into contiguous runs."""
    qs = sorted(set(q_lens))
    best = None
    for cuts in itertools.product([False, True], repeat=len(qs) - 1):
        groups, current = [], [qs[0]]
        for q, cut in zip(qs[1:], cuts):
            if cut:
                groups.append(current)
                current = []
            current.append(q)
        groups.append(current)
        members = [[i for i, q in enumerate(q_lens) if q in g] for g in groups]
        cost = padded_cost(members, q_lens, kv_lens, overhead)
        best = cost if best is None else min(best, cost)
    return best


def test_a_prefill_chunk_and_a_deep_tree_do_not_pad_the_decodes():
    q_lens = [1] * 15 + [200] + [8] * 4
    kv_lens = [400] * 15 + [200] + [420] * 4
    groups = plan_groups(q_lens, kv_lens)
    assert groups == [list(range(15)), list(range(16, 20)), [15]]


def test_small_batches_stay_one_call_and_every_index_is_placed_once():
    assert plan_groups([1, 3, 1, 2], [10, 12, 11, 9]) == [[0, 1, 2, 3]]
    assert plan_groups([1, 3, 1, 2], [10, 12, 11, 9], call_overhead=0) == [[0, 2], [3], [1]]


def test_the_plan_is_the_cheapest_contiguous_partition():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        q_lens = [rng.choice([1, 1, 1, 2, 4, 6, 9, 16, 64, 128]) for _ in range(n)]
        kv_lens = [rng.randint(q, q + 500) for q in q_lens]
        overhead = rng.choice([0, 512, 4096, 100_000])
        groups = plan_groups(q_lens, kv_lens, overhead)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert padded_cost(groups, q_lens, kv_lens, overhead) == brute_force_cost(q_lens, kv_lens, overhead)


def test_a_batch_split_into_groups_gives_each_sequence_its_own_logits(tiny):
    """A prefill chunk, a draft tree and two decodes of different lengths, each group its
    own call (no call overhead), equal each sequence run alone."""
    bs = 4
    kv = KVCache.allocate(tiny.config, num_blocks=96, block_size=bs, dtype=torch.float32)
    runner = ModelRunner(tiny.model, kv, attention_call_overhead=0)
    tables = [list(range(i * 20, i * 20 + 20)) for i in range(4)]
    prefixes = [list(range(30, 41)), list(range(50, 57)), list(range(60, 73)), []]
    runner.forward([SeqInput(p, 0, t, logits="none") for p, t in zip(prefixes[:3], tables)])
    parents, tree_tokens = [-1, 0, 0, 1, 3], [11, 12, 13, 14, 15]
    chunk = list(range(80, 98))
    seqs = [
        SeqInput([5], len(prefixes[0]), tables[0]),
        SeqInput(tree_tokens, len(prefixes[1]), tables[1], tree_mask=ancestors_mask(parents), logits="all",
                 positions=[len(prefixes[1]) + depth(parents, i) for i in range(len(parents))]),
        SeqInput([6], len(prefixes[2]), tables[2]),
        SeqInput(chunk, 0, tables[3], logits="all"),
    ]
    _, _, meta, offsets = runner.prepare(seqs)
    assert [g.batch_size for g in meta.groups] == [2, 1, 1]  # the decodes, the tree, the chunk
    assert offsets == [0, 2, 1, 7]  # tokens laid out group by group
    out = runner.forward(seqs).logits

    alone = ModelRunner(tiny.model, KVCache.allocate(tiny.config, num_blocks=96, block_size=bs,
                                                     dtype=torch.float32))
    scratch = list(range(80, 96))
    assert torch.allclose(out[0][0], alone.forward([SeqInput(prefixes[0] + [5], 0, scratch)]).logits[0][0], atol=1e-4)
    assert torch.allclose(out[2][0], alone.forward([SeqInput(prefixes[2] + [6], 0, scratch)]).logits[0][0], atol=1e-4)
    want_chunk = alone.forward([SeqInput(chunk, 0, scratch, logits="all")]).logits[0]
    assert torch.allclose(out[3], want_chunk, atol=1e-4)
    for leaf in range(len(parents)):
        path, j = [], leaf
        while j != -1:
            path.append(tree_tokens[j])
            j = parents[j]
        want = alone.forward([SeqInput(prefixes[1] + path[::-1], 0, scratch)]).logits[0][0]
        assert torch.allclose(out[1][leaf], want, atol=1e-4), f"tree node {leaf}"

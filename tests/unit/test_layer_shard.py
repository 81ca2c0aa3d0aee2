"""EasySpec across ranks: a parallel group's attention sublayers split over gloo ranks and
summed by all-reduce give the one-process layer-parallel forward, the same bits on every
rank (so ranks take the same tree decisions), and each rank writes KV only for its layers.

The ranks are threads of this process, each with its own KV cache and gloo group member;
the draft-worker integration test runs them as separate Ray actors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.runtime.kv_cache import KVCache
from services.runtime.model.llama import LayerPlan, LayerShard
from services.runtime.model_runner import ModelRunner, SeqInput
from services.transfer.rank_group import RankGroup, host_store

GROUPS = ((1, 2, 3, 4),)


def _forward(model, config, ids, plan):
    kv = KVCache.allocate(config, num_blocks=16, block_size=4, dtype=torch.float32)
    logits = ModelRunner(model, kv).forward([SeqInput(ids, 0, list(range(8)), logits="all")], plan=plan).logits[0]
    return logits, kv


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_parallel_groups_equal_the_one_process_forward(tiny, world):
    ids = list(range(10, 31))
    want, _ = _forward(tiny.model, tiny.config, ids, LayerPlan(parallel_groups=GROUPS))
    store, address = host_store()

    def rank(r: int):
        group = RankGroup.join(f"test-{world}", address, r, world, store=store if r == 0 else None, timeout_s=30)
        shard = LayerShard(r, world, group.all_reduce)
        return _forward(tiny.model, tiny.config, ids, LayerPlan(parallel_groups=GROUPS, shard=shard))

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(rank, range(world)))
    for r, (logits, kv) in enumerate(results):
        assert torch.allclose(logits, want, atol=1e-5), f"rank {r}"
        assert torch.equal(logits, results[0][0]), f"rank {r} differs from rank 0"
        mine = set(GROUPS[0][r::world])
        for layer in GROUPS[0]:  # each group layer's KV was written by exactly its owner
            written = bool(kv.layers[layer][0].abs().sum() > 0)
            assert written == (layer in mine), f"rank {r}, layer {layer}"
        assert kv.layers[0][0].abs().sum() > 0 and kv.layers[5][0].abs().sum() > 0  # layers outside groups: all


def test_a_shard_rank_must_lie_inside_the_world():
    with pytest.raises(ValueError, match="rank must be in"):
        LayerShard(2, 2, lambda t: None)

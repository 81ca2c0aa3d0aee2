"""Tree-verify mode: one forward over a draft tree gives, at every node, the logits that
sequential decoding along that node's root path gives."""

from __future__ import annotations

import torch

from services.runtime.kv_cache import KVCache
from services.runtime.model_runner import ModelRunner, SeqInput


def ancestors_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: node i sees node j iff j is i or an ancestor of i (parents[0] == -1 is the root)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def depth(parents: list[int], i: int) -> int:
    d = 0
    while parents[i] != -1:
        i, d = parents[i], d + 1
    return d


def test_tree_logits_equal_sequential_decode(tiny):
    bs = 4
    prefix = list(range(20, 33))  # 13 tokens: the last block is partly filled
    # root (the last committed token) + 9 draft nodes in 3 branches of varying depth
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7]
    tokens = [5, 17, 42, 99, 7, 8, 250, 3, 3, 61]
    n = len(tokens)
    start = len(prefix)

    kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=bs, dtype=torch.float32)
    runner = ModelRunner(tiny.model, kv)
    table = list(range(10))
    runner.forward([SeqInput(prefix, 0, table, logits="none")])
    positions = [start + depth(parents, i) for i in range(n)]
    tree = runner.forward([SeqInput(tokens, start, table, positions=positions,
                                    tree_mask=ancestors_mask(parents), logits="all")]).logits[0]

    for leaf in range(n):
        path = []
        j = leaf
        while j != -1:
            path.append(tokens[j])
            j = parents[j]
        seq = prefix + path[::-1]
        ref_kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=bs, dtype=torch.float32)
        ref = ModelRunner(tiny.model, ref_kv).forward([SeqInput(seq, 0, table, logits="last")]).logits[0][0]
        assert torch.allclose(tree[leaf], ref, atol=1e-4), f"node {leaf}"


def test_trees_of_different_sizes_in_one_batch(tiny):
    """Two sequences with different tree sizes and a plain decode share one forward pass."""
    kv = KVCache.allocate(tiny.config, num_blocks=64, block_size=4, dtype=torch.float32)
    runner = ModelRunner(tiny.model, kv)
    tables = [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    prefixes = [list(range(30, 39)), list(range(40, 55)), list(range(60, 66))]
    runner.forward([SeqInput(p, 0, t, logits="none") for p, t in zip(prefixes, tables)])
    trees = [([-1, 0, 0, 1], [11, 12, 13, 14]), ([-1, 0], [21, 22])]
    seqs = []
    for (parents, toks), p, t in zip(trees, prefixes, tables):
        pos = [len(p) + depth(parents, i) for i in range(len(toks))]
        seqs.append(SeqInput(toks, len(p), t, positions=pos, tree_mask=ancestors_mask(parents), logits="all"))
    seqs.append(SeqInput([77], len(prefixes[2]), tables[2]))
    out = runner.forward(seqs).logits

    alone_kv = KVCache.allocate(tiny.config, num_blocks=64, block_size=4, dtype=torch.float32)
    alone = ModelRunner(tiny.model, alone_kv)
    for (parents, toks), p, got in zip(trees, prefixes, out[:2]):
        for leaf in range(len(toks)):
            path, j = [], leaf
            while j != -1:
                path.append(toks[j])
                j = parents[j]
            want = alone.forward([SeqInput(p + path[::-1], 0, list(range(40, 50)))]).logits[0][0]
            assert torch.allclose(got[leaf], want, atol=1e-4)
    want = alone.forward([SeqInput(prefixes[2] + [77], 0, list(range(40, 50)))]).logits[0][0]
    assert torch.allclose(out[2][0], want, atol=1e-4)


def test_tree_grown_over_two_passes_equals_sequential(tiny):
    """A draft model grows its tree a level per pass: a new node sees its ancestors among the
    nodes already cached, never their siblings."""
    kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=4, dtype=torch.float32)
    runner = ModelRunner(tiny.model, kv)
    table = list(range(10))
    prefix = list(range(40, 51))
    start = len(prefix)
    runner.forward([SeqInput(prefix, 0, table, logits="none")])
    # pass 1: three siblings at depth 1 (slots start .. start + 2)
    level1 = [7, 8, 9]
    runner.forward([SeqInput(level1, start, table, positions=[start] * 3,
                             tree_mask=torch.eye(3, dtype=torch.bool), logits="none")])
    # pass 2: two children of sibling 1 (token 8) and one of sibling 2 (token 9)
    level2, parent_of = [20, 21, 22], [1, 1, 2]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, p in enumerate(parent_of):
        mask[i, p] = True  # its parent among the cached level-1 nodes
        mask[i, 3 + i] = True  # itself
    got = runner.forward([SeqInput(level2, start + 3, table, positions=[start + 1] * 3,
                                   tree_mask=mask, tree_start=start, logits="all")]).logits[0]
    for i, p in enumerate(parent_of):
        ref_kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=4, dtype=torch.float32)
        seq = prefix + [level1[p], level2[i]]
        want = ModelRunner(tiny.model, ref_kv).forward([SeqInput(seq, 0, table)]).logits[0][0]
        assert torch.allclose(got[i], want, atol=1e-4)


def test_the_step_mask_is_additive_and_attends_exactly_as_the_boolean_one(tiny):
    """The runner builds the 0 / -inf mask once per step that SDPA would otherwise derive from a
    boolean mask in every layer: same scores, bit for bit."""
    import torch.nn.functional as F

    from services.runtime.model_runner import additive_mask

    kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=4, dtype=torch.float32)
    runner = ModelRunner(tiny.model, kv)
    parents = [-1, 0, 0, 1]
    _, _, meta, _ = runner.prepare([SeqInput([5, 6, 7, 8], 9, list(range(4)), positions=[9, 10, 10, 11],
                                             tree_mask=ancestors_mask(parents))])
    (group,) = meta.groups
    allowed = torch.zeros(1, 1, 4, 13, dtype=torch.bool)
    allowed[..., :9] = True  # the cached prefix
    allowed[0, 0, :, 9:] = ancestors_mask(parents)
    assert group.mask.dtype == torch.float32
    assert torch.equal(group.mask == 0, allowed) and torch.equal(group.mask == float("-inf"), ~allowed)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    with_bool = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    with_additive = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(allowed, torch.float32),
                                                   enable_gqa=True)
    assert torch.equal(with_bool, with_additive)

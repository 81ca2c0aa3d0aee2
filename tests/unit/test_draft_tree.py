"""DraftTree helpers that PEARL's look-ahead drafts use: the main path and re-rooted subtrees."""

from __future__ import annotations

import torch

from services.spec.tree import ROOT, DraftTree


def _tree() -> DraftTree:
    #        root
    #       /    \
    #     a(0)   b(1)
    #    /   \      \
    #  c(2)  d(3)   e(4)
    #   |
    #  f(5)
    return DraftTree([10, 11, 12, 13, 14, 15], [ROOT, ROOT, 0, 0, 1, 2], source=list("abcdef"))


def test_main_path_follows_first_children():
    assert _tree().main_path() == [0, 2, 5]
    assert DraftTree.empty().main_path() == []


def test_subtree_re_roots_the_descendants_of_a_node():
    sub = _tree().subtree(0)
    assert sub.tokens == [12, 13, 15] and sub.parents == [ROOT, ROOT, 0] and sub.source == list("cdf")
    assert _tree().subtree(1).tokens == [14] and _tree().subtree(5).tokens == []


def test_subtree_keeps_the_sibling_distributions_below_the_node():
    q = {ROOT: torch.tensor([1.0]), 0: torch.tensor([2.0]), 2: torch.tensor([3.0])}
    tree = DraftTree([10, 11, 12, 13, 14, 15], [ROOT, ROOT, 0, 0, 1, 2], sibling_dists=q)
    sub = tree.subtree(0)
    assert set(sub.sibling_dists) == {ROOT, 0}
    assert sub.sibling_dists[ROOT].item() == 2.0 and sub.sibling_dists[0].item() == 3.0

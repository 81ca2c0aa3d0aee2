"""A draft token tree: what a drafter proposes for one request and one verify step.

Nodes are listed parents-first. The verify forward feeds the root (the request's last
committed token, whose KV is not yet computed) followed by the nodes, so node `i` sits
at forward index `i + 1`; its position is `prefix length + depth`, and it attends to the
prefix, its ancestors and itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

ROOT = -1


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]  # parent node index, ROOT (-1) for children of the root
    sibling_dists: dict[int, torch.Tensor] | None = None
    """For stochastic drafts: parent index -> the distribution q [V] its children were drawn
    from, without replacement, in node order. None: proposals are deterministic (point masses)."""
    source: list[str] = field(default_factory=list)  # optional: which drafter proposed each node

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not ROOT <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come first")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    @classmethod
    def empty(cls) -> DraftTree:
        return cls([], [])

    @cached_property
    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p == ROOT else d[p] + 1)
        return d

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """Parent index (ROOT for the root) -> child node indices, in node order."""
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
        return out

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def main_path(self) -> list[int]:
        """Node indices along first children from the root: the drafter's own best guess."""
        path: list[int] = []
        kids = self.children.get(ROOT)
        while kids:
            path.append(kids[0])
            kids = self.children.get(kids[0])
        return path

    def subtree(self, node: int) -> DraftTree:
        """The descendants of `node`, re-rooted: its children become the root's children."""
        inside: dict[int, int] = {node: ROOT}  # old index -> new index (node itself -> ROOT)
        keep: list[int] = []
        for i in range(node + 1, len(self.parents)):
            if self.parents[i] in inside:
                inside[i] = len(keep)
                keep.append(i)
        dists = None
        if self.sibling_dists is not None:
            dists = {inside[p]: q for p, q in self.sibling_dists.items() if p in inside}
        return DraftTree([self.tokens[i] for i in keep], [inside[self.parents[i]] for i in keep], dists,
                         [self.source[i] for i in keep] if self.source else [])

    def attention_mask(self) -> torch.Tensor:
        """[n + 1, n + 1] bool over (root, nodes): each sees itself and its ancestors."""
        n = len(self.tokens)
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            if p != ROOT:
                mask[i + 1] |= mask[p + 1]
        return mask

    def capped(self, max_nodes: int, max_depth: int) -> DraftTree:
        """The tree itself where it fits both limits, else pruned to them."""
        if len(self) <= max_nodes and (not self.depths or max(self.depths) <= max_depth):
            return self
        return self.pruned(max_nodes, max_depth)

    def pruned(self, max_nodes: int, max_depth: int | None = None) -> DraftTree:
        """The first `max_nodes` nodes (parents-first order keeps the tree connected), at most `max_depth` deep."""
        keep: list[int] = []
        kept: set[int] = set()
        for i, (p, d) in enumerate(zip(self.parents, self.depths)):
            if len(keep) == max_nodes:
                break
            if (max_depth is None or d <= max_depth) and (p == ROOT or p in kept):
                keep.append(i)
                kept.add(i)
        return self.subset(keep)

    def subset(self, keep: list[int]) -> DraftTree:
        """The nodes `keep` (ascending, each with its parent kept), renumbered. For stochastic
        drafts each sibling group must keep a prefix of its draw order, which both pruning
        rules here do: siblings share depth and parent, and gains fall with sibling rank."""
        new_index = {old: new for new, old in enumerate(keep)}
        dists = None
        if self.sibling_dists is not None:
            dists = {(ROOT if p == ROOT else new_index[p]): q for p, q in self.sibling_dists.items()
                     if p == ROOT or p in new_index}
        return DraftTree(
            tokens=[self.tokens[i] for i in keep],
            parents=[ROOT if self.parents[i] == ROOT else new_index[self.parents[i]] for i in keep],
            sibling_dists=dists,
            source=[self.source[i] for i in keep] if self.source else [],
        )

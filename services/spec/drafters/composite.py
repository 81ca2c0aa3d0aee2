"""`auto`: several drafters' proposals merged into one token trie.

Each drafter proposes its own tree; the trees are merged by token path (a node two drafters
both propose appears once), every node labelled with the first drafter that proposed it.
The goodput controller then keeps the nodes worth verifying, using acceptance learned per
(drafter, depth, rank): choosing the drafter and the length per request and per step is
that selection. Merging is only sound for deterministic proposals, which all training-free
drafters make.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.drafter import Drafter
from services.spec.tree import ROOT, DraftTree


def merge_trees(trees: Sequence[DraftTree], sources: Sequence[str]) -> DraftTree:
    tokens: list[int] = []
    parents: list[int] = []
    labels: list[str] = []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree, source in zip(trees, sources):
        if tree.sibling_dists is not None:
            raise ValueError(f"{source}: stochastic proposals cannot be merged with others")
        mapped: list[int] = []
        for token, parent in zip(tree.tokens, tree.parents):
            merged_parent = ROOT if parent == ROOT else mapped[parent]
            key = (merged_parent, token)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
                labels.append(tree.source[len(mapped)] if tree.source else source)
            mapped.append(index[key])
    return DraftTree(tokens, parents, source=labels)


class CompositeDrafter(Drafter):
    name = "auto"

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        if not drafters:
            raise ValueError("a composite drafter needs at least one drafter")
        self.drafters = list(drafters)

    @property
    def wants_prompt_logits(self) -> bool:  # type: ignore[override]
        return any(d.wants_prompt_logits for d in self.drafters)

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        per_drafter = [d.propose(reqs, budgets) for d in self.drafters]
        names = [d.name for d in self.drafters]
        return [merge_trees([trees[i] for trees in per_drafter], names) for i in range(len(reqs))]

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor, result: Acceptance) -> None:
        for d in self.drafters:
            d.observe(req, tree, logits, result)

    def observe_prompt(self, req: Request, start: int, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        for d in self.drafters:
            if d.wants_prompt_logits:
                d.observe_prompt(req, start, token_ids, logits)

    def release(self, req: Request) -> None:
        for d in self.drafters:
            d.release(req)

    def state_bytes(self) -> int:
        return sum(d.state_bytes() for d in self.drafters)

"""Token Recycling (Luo et al., "Turning Trash into Treasure", ACL 2025).

State: an adjacency matrix [vocab, k] of token ids, k = 8. Row t holds the target's top-k
next tokens the last time t was an input of a verify step. After every verification the
row of *every* tree input token — the root and all nodes, rejected branches included (the
recycled "trash") — is overwritten with the top-k of the target logits at that node.

Drafting fills a static breadth-first template from the matrix: template node [a, b, c]
is candidate a of the root's row, then candidate b of that token's row, then candidate c.
The template is the paper's "2.2.2" tree (80 nodes, depths 1-6 with 8/21/25/15/8/3 nodes),
listed breadth-first; a node budget keeps its first nodes, so the tree stays connected.

The matrix is created once per drafter (one per engine, i.e. per model and process) and
kept across requests ("hot start"): what one request teaches helps the next. Tenants
sharing a model share it too; it holds token ids only, never text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.drafter import Drafter, TopCandidates, top_candidates
from services.spec.tree import ROOT, DraftTree

# The "2.2.2" template: each entry is a path of candidate ranks from the root, breadth-first.
TEMPLATE_2_2_2: list[tuple[int, ...]] = [
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7),
    (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 0, 6), (0, 0, 7),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0),
    (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 0, 4), (0, 0, 1, 0), (0, 0, 1, 1),
    (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0),
    (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
]

UNKNOWN = -1  # a row no verify step has written yet


class TokenRecyclingDrafter(Drafter):
    name = "token-recycling"
    wants_prompt_logits = True
    prompt_logits_optional = True  # decode steps keep its matrix current under load
    observed_candidates = 8  # k of the default adjacency matrix

    def __init__(self, vocab_size: int, k: int = 8, template: Sequence[tuple[int, ...]] = TEMPLATE_2_2_2) -> None:
        self.k = k
        self.template = list(template)
        if any(r >= k for path in self.template for r in path):
            raise ValueError(f"the template uses candidate ranks >= k = {k}")
        self.parent_of = [self.template.index(p[:-1]) if len(p) > 1 else ROOT for p in self.template]
        self.rank_of = [p[-1] for p in self.template]
        self.adjacency = torch.full((vocab_size, k), UNKNOWN, dtype=torch.int32)
        self.observed_candidates = k

    def state_bytes(self) -> int:
        return self.adjacency.numel() * self.adjacency.element_size()

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        return [self._fill(req.token_ids[-1], budget) for req, budget in zip(reqs, budgets)]

    def _fill(self, root: int, budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        index_of: dict[int, int] = {}  # template index -> tree node index
        rows: dict[int, list[int]] = {}  # token -> its candidate row, read once per proposal
        for t, (parent, rank) in enumerate(zip(self.parent_of, self.rank_of)):
            if len(tokens) >= budget:
                break
            if parent != ROOT and parent not in index_of:
                continue  # its parent had no candidate: the subtree is empty
            source = root if parent == ROOT else tokens[index_of[parent]]
            row = rows.get(source)
            if row is None:
                row = rows[source] = self.adjacency[source].tolist()
            candidate = row[rank]
            if candidate == UNKNOWN:
                continue
            index_of[t] = len(tokens)
            tokens.append(candidate)
            parents.append(ROOT if parent == ROOT else index_of[parent])
        return DraftTree(tokens, parents)

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor | TopCandidates,
                result: Acceptance) -> None:
        self._recycle([req.token_ids[-1]] + tree.tokens, logits)  # the root, then every node

    def observe_prompt(self, req: Request, start: int, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        self._recycle(list(token_ids), logits)

    def _recycle(self, inputs: list[int], logits: torch.Tensor | TopCandidates) -> None:
        top = top_candidates(logits, self.k)  # [len(inputs), k]
        self.adjacency[torch.tensor(inputs, dtype=torch.long)] = top

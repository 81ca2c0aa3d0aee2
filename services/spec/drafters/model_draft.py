"""Drafting with a model: a dynamic token tree grown one depth per draft forward.

Tree growth follows DySpec (Xiong et al. 2024, the threshold form of its greedy heap
expansion): every node has a value, the draft's estimate that its whole path is accepted
(the product of draft probabilities along it). Each depth, one batched draft forward over
the newest nodes gives their next-token distributions; a node then takes children in
order — the most likely token of its remaining distribution ("top"), or a draw without
replacement ("sample") — each child worth value x p(token), the node's remaining value
shrinking by (1 - p(token)), while that remaining value is above the threshold and the node
has fewer than `branching` children. Nodes are only expanded while the chance that their path holds a
rejection, 1 - value, stays under the SpecDec++ threshold h (Huang et al. 2024, with the
draft probability as the training-free acceptance estimate).

"top" proposals are deterministic, so verification uses the point-mass rule and a seeded
request emits exactly what it would without speculation. "sample" proposals record the
distribution each sibling group was drawn from, for recursive rejection sampling.

Backends differ in where the draft's KV lives and how its root is computed: a separate
draft model with its own paged cache (draft_model.py), or the target's own layers minus a
skipped subset, writing scratch KV into the request's slots beyond its committed tokens
(self_draft.py). Either may run its layers EasySpec-style (`parallel_group`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.runtime.keyed_random import STREAM_DRAFT, keyed_uniform
from services.runtime.model.llama import LayerPlan
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.request import Request
from services.runtime.sampler import target_probs
from services.spec.drafter import Drafter
from services.spec.tree import ROOT, DraftTree


@dataclass(frozen=True)
class ModelDraftConfig:
    max_depth: int = 6
    """Deepest draft node (SpecDec++ bounds candidates to [2, 20]; a CPU wants fewer)."""
    branching: int = 3
    """Most children one node takes."""
    min_value: float = 0.05
    """DySpec threshold: a node takes another child only while its remaining value is above this
    (about 1 / budget)."""
    stop_threshold: float = 0.7
    """SpecDec++ h: a node is expanded only while 1 - value <= h."""
    proposal: Literal["top", "sample"] = "top"
    """Deterministic most-likely tokens, or draws without replacement (verified by recursive rejection)."""
    parallel_group: int = 1
    """EasySpec: consecutive draft layers per parallel group (1 = sequential). The first and last
    layers always run alone."""

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.branching < 1:
            raise ValueError("max_depth and branching must be >= 1")
        if not 0 < self.stop_threshold < 1 or not 0 <= self.min_value < 1:
            raise ValueError("stop_threshold must be in (0, 1) and min_value in [0, 1)")
        if self.proposal not in ("top", "sample"):
            raise ValueError(f"proposal must be 'top' or 'sample', got {self.proposal!r}")
        if self.parallel_group < 1:
            raise ValueError(f"parallel_group must be >= 1, got {self.parallel_group}")


def parallel_groups(num_layers: int, size: int, layers: Sequence[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Groups of `size` consecutive layers, the first and last layers excluded (EasySpec)."""
    if size <= 1:
        return ()
    middle = [i for i in (layers if layers is not None else range(num_layers)) if 0 < i < num_layers - 1]
    groups = [tuple(middle[i:i + size]) for i in range(0, len(middle), size)]
    # A group must be consecutive layer indices to run as one step of the layer walk.
    return tuple(g for g in groups if len(g) > 1 and g[-1] - g[0] == len(g) - 1)


@dataclass
class _Growing:
    """One request's tree while it grows."""

    req: Request
    budget: int
    table: list[int]
    root_slot: int  # the root's KV slot; node i sits at root_slot + 1 + i
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    dists: dict[int, torch.Tensor] = field(default_factory=dict)  # parent -> q its children came from

    def tree(self, sample: bool) -> DraftTree:
        return DraftTree(self.tokens, self.parents, sibling_dists=dict(self.dists) if sample else None)


class ModelDrafter(Drafter):
    """DySpec expansion over a backend that supplies the root distributions and runs draft passes."""

    def __init__(self, config: ModelDraftConfig) -> None:
        self.config = config
        self.passes = 0  # draft forward passes run (for cost accounting)

    @abstractmethod
    def _begin(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[tuple[_Growing, torch.Tensor] | None]:
        """Per request: its growing tree (table, root slot) and the draft logits [V] at the root;
        None when the request gets no draft this step."""

    _runner: ModelRunner  # set by the backend: the runner the draft passes go through
    _plan: LayerPlan | None  # and how they walk the layers (None: all of them, in order)

    @property
    def runner(self) -> ModelRunner:
        return self._runner

    @property
    def draft_plan(self) -> LayerPlan | None:
        return self._plan

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        sample = self.config.proposal == "sample"
        started = self._begin(reqs, budgets)
        growing = [g for g, _ in filter(None, started)]
        # frontier: (tree, parent node or ROOT, draft logits there)
        frontier = [(g, ROOT, logits) for g, logits in filter(None, started)]
        for depth in range(1, self.config.max_depth + 1):
            new: list[tuple[_Growing, int]] = []
            for g, parent, logits in frontier:
                for node in self._children(g, parent, logits, depth, sample):
                    new.append((g, node))
            if not new or depth == self.config.max_depth:
                break
            expandable = [(g, n) for g, n in new if 1 - g.values[n] <= self.config.stop_threshold
                          and len(g.tokens) < g.budget]
            if not expandable:
                break
            frontier = self._forward(expandable)
        trees = {id(g.req): g.tree(sample) for g in growing}
        return [trees.get(id(r), DraftTree.empty()) for r in reqs]

    def _children(self, g: _Growing, parent: int, logits: torch.Tensor, depth: int, sample: bool) -> list[int]:
        params = g.req.params
        q = torch.softmax(logits.float(), -1) if params.greedy else target_probs(logits[None], [params])[0]
        value = 1.0 if parent == ROOT else g.values[parent]
        if sample:
            order = _draws_without_replacement(q, self.config.branching, g.req.seed, g.root_slot + depth, parent)
        else:
            order = q.topk(min(self.config.branching, q.numel())).indices.tolist()
        remaining, residual_mass = value, 1.0
        added = []
        for token in order:
            # DySpec: the parent's next slot is filled while the slot is still worth the threshold;
            # the child then keeps its own value, which decides whether it is expanded later.
            if remaining < self.config.min_value or len(g.tokens) >= g.budget:
                break
            p = q[token].item() / residual_mass if residual_mass > 0 else 0.0
            g.tokens.append(token)
            g.parents.append(parent)
            g.depths.append(depth)
            g.values.append(remaining * p)
            added.append(len(g.tokens) - 1)
            remaining *= 1 - p
            residual_mass -= q[token].item()
        if added and sample:
            g.dists[parent] = q
        return added

    def _forward(self, nodes: list[tuple[_Growing, int]]) -> list[tuple[_Growing, int, torch.Tensor]]:
        """One draft pass over the given new nodes of several trees; returns their logits."""
        by_tree: dict[int, list[int]] = {}
        trees: dict[int, _Growing] = {}
        for g, n in nodes:
            by_tree.setdefault(id(g), []).append(n)
            trees[id(g)] = g
        seqs = []
        order = []
        for key, new in by_tree.items():
            g = trees[key]
            # Nodes are created depth by depth, so this pass's nodes are the tree's newest ones:
            # nodes[first:] sit after every earlier node's slot.
            first = min(new)
            batch = list(range(first, len(g.tokens)))
            mask = torch.zeros(len(batch), len(g.tokens), dtype=torch.bool)
            for row, n in enumerate(batch):
                a = n
                while a != ROOT:
                    mask[row, a] = True
                    a = g.parents[a]
            seqs.append(SeqInput(
                [g.tokens[n] for n in batch], g.root_slot + 1 + first, g.table,
                positions=[g.root_slot + g.depths[n] for n in batch],
                tree_mask=mask, tree_start=g.root_slot + 1, logits="all",
            ))
            order.append((g, batch, set(new)))
        out = self.runner.forward(seqs, plan=self.draft_plan)
        self.passes += 1
        frontier = []
        for (g, batch, wanted), logits in zip(order, out.logits):
            for row, n in enumerate(batch):
                if n in wanted:
                    frontier.append((g, n, logits[row]))
        return frontier


def _draws_without_replacement(q: torch.Tensor, k: int, seed: int, position: int, parent: int) -> list[int]:
    """Gumbel-top-k: k distinct tokens in sequential without-replacement order, keyed noise."""
    key = int(keyed_uniform(seed, position, STREAM_DRAFT, parent + 2) * (1 << 53))
    gen = torch.Generator().manual_seed(key)
    gumbel = -torch.log(-torch.log(torch.rand(q.shape, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)))
    scores = torch.where(q > 0, q.double().log() + gumbel, torch.tensor(float("-inf"), dtype=torch.float64))
    k = min(k, int((q > 0).sum()))
    return scores.topk(k).indices.tolist()

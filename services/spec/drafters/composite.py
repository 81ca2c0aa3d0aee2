"""`auto`: several drafters' proposals merged into one token trie.

Each drafter proposes its own tree; the trees are merged by token path (a node two drafters
both propose appears once), every node labelled with the drafters that proposed it, in member
order ("ngram+token-recycling"). The goodput controller then keeps the nodes worth verifying,
using acceptance learned per (label, depth, rank): choosing the drafter and the length per
request and per step is that selection. Agreement is a signal of its own: a token that two
drafters propose independently is accepted far more often (measured on HumanEval: over 80%
when all four training-free drafters agree, against 10-25% for one alone). Merging is only
sound for deterministic proposals, which all training-free drafters make.

Drafting time counts too: a member whose accepted tokens (credited to the nodes it proposed)
are worth less than the share of a step its drafting takes is benched, and tried again
after `probe_every` steps, so `auto` never pays for a drafter that does not pay back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.drafter import Drafter
from services.spec.tree import ROOT, DraftTree

SEPARATOR = "+"


def merge_trees(trees: Sequence[DraftTree], sources: Sequence[str]) -> DraftTree:
    tokens: list[int] = []
    parents: list[int] = []
    proposers: list[list[str]] = []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree, source in zip(trees, sources):
        if tree.sibling_dists is not None:
            raise ValueError(f"{source}: stochastic proposals cannot be merged with others")
        mapped: list[int] = []
        for token, parent in zip(tree.tokens, tree.parents):
            merged_parent = ROOT if parent == ROOT else mapped[parent]
            key = (merged_parent, token)
            label = tree.source[len(mapped)] if tree.source else source
            if key not in index:
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
                proposers.append([])
            if label not in proposers[index[key]]:
                proposers[index[key]].append(label)
            mapped.append(index[key])
    return DraftTree(tokens, parents, source=[SEPARATOR.join(p) for p in proposers])


def proposers_of(label: str) -> list[str]:
    return label.split(SEPARATOR)


@dataclass
class _Member:
    drafter: Drafter
    seconds: float | None = None  # EMA of drafting time per step
    gain: float | None = None  # EMA of accepted tokens credited to it per verified tree
    steps: int = 0
    benched_for: int = 0


class CompositeDrafter(Drafter):
    name = "auto"

    def __init__(self, drafters: Sequence[Drafter], probe_every: int = 16, smoothing: float = 0.1,
                 warmup_steps: int = 8) -> None:
        if not drafters:
            raise ValueError("a composite drafter needs at least one drafter")
        self.members = [_Member(d) for d in drafters]
        self.probe_every, self.smoothing, self.warmup = probe_every, smoothing, warmup_steps
        self.step_seconds: float | None = None  # EMA of time between proposals: a whole step
        self.gain: float | None = None  # EMA of accepted tokens per verified tree, all members
        self._last_propose: float | None = None
        self._active: list[_Member] = []

    @property
    def drafters(self) -> list[Drafter]:
        return [m.drafter for m in self.members]

    @property
    def wants_prompt_logits(self) -> bool:  # type: ignore[override]
        return any(d.wants_prompt_logits for d in self.drafters)

    @property
    def prompt_logits_optional(self) -> bool:  # type: ignore[override]
        return all(d.prompt_logits_optional for d in self.drafters if d.wants_prompt_logits)

    @property
    def observed_candidates(self) -> int:  # type: ignore[override]
        return max(d.observed_candidates for d in self.drafters)

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        now = time.perf_counter()
        if self._last_propose is not None:
            self.step_seconds = self._ema(self.step_seconds, now - self._last_propose)
        self._last_propose = now
        self._active = [m for m in self.members if self._worth_running(m)]
        per_drafter = []
        for m in self._active:
            started = time.perf_counter()
            per_drafter.append(m.drafter.propose(reqs, budgets))
            m.seconds = self._ema(m.seconds, time.perf_counter() - started)
            m.steps += 1
        names = [m.drafter.name for m in self._active]
        return [merge_trees([trees[i] for trees in per_drafter], names) for i in range(len(reqs))]

    def _worth_running(self, m: _Member) -> bool:
        """The tokens it gains per step against those its drafting time would have yielded:
        a step of step_seconds yields 1 + gain tokens per request."""
        if m.steps < self.warmup or None in (self.step_seconds, m.seconds, m.gain, self.gain):
            return True
        if m.benched_for > 0:
            m.benched_for -= 1
            return m.benched_for == 0  # the last benched step is a probe
        if m.gain < m.seconds / self.step_seconds * (1 + self.gain):
            m.benched_for = self.probe_every
            return False
        return True

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor, result: Acceptance) -> None:
        if len(tree):
            credit: dict[str, int] = {}
            for node in result.accepted_nodes:
                for source in proposers_of(tree.source[node] if tree.source else ""):
                    credit[source] = credit.get(source, 0) + 1
            for m in self._active:
                m.gain = self._ema(m.gain, credit.get(m.drafter.name, 0))
            self.gain = self._ema(self.gain, result.num_accepted)
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

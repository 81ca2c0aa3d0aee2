"""Speculation inside the engine's step: draft before scheduling, accept after the forward.

The engine calls `draft` for requests that are decoding, schedules each drafted request
for its root plus its tree nodes (one catch-up rule: its computed tokens catch up to its
tokens plus the draft), runs one forward over all trees of the batch, then calls
`accept` per request. Acceptance statistics are counted per drafter and per position.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.runtime.request import Request
from services.spec.acceptance import Acceptance, accept
from services.spec.config import SpecConfig
from services.spec.cost_model import StepCostModel, StepWork, seq_work
from services.spec.drafter import Drafter, TopCandidates, top_candidates
from services.spec.goodput import AcceptanceModel, DraftGate, GoodputController, momentum_bucket
from services.spec.tree import DraftTree


@dataclass
class SpecStats:
    """Counters behind acceptance rate and mean accepted tokens (CONVENTIONS.md, metrics)."""

    drafts: int = 0  # verify steps of a request that carried a non-empty tree
    draft_tokens: int = 0  # tree nodes proposed
    accepted_tokens: int = 0  # draft tokens accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [d] = drafts with >= d + 1 accepted
    draft_seconds: float = 0.0
    # How the goodput controller's choices turned out against what its models expected: the
    # tokens the nodes it kept were expected to gain and gained, and the steps that verified
    # them, predicted and measured (forward plus the rest of the step, drafting aside).
    expected_accepted: float = 0.0
    controlled_accepted: int = 0
    controlled_steps: int = 0
    predicted_seconds: float = 0.0
    controlled_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens a drafted step commits, the bonus token included."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    def record(self, tree: DraftTree, result: Acceptance) -> None:
        self.drafts += 1
        self.draft_tokens += len(tree)
        self.accepted_tokens += result.num_accepted
        while len(self.accepted_per_position) < result.num_accepted:
            self.accepted_per_position.append(0)
        for d in range(result.num_accepted):
            self.accepted_per_position[d] += 1


CANDIDATES_PER_NODE = 3  # candidates offered to the goodput controller per node it may keep


class Speculator:
    def __init__(self, drafter: Drafter, config: SpecConfig, cost: StepCostModel | None = None) -> None:
        self.drafter = drafter
        self.config = config
        self.cost = cost or StepCostModel()
        self.controller = GoodputController(
            self.cost, AcceptanceModel(), config.max_nodes) if config.adaptive else None
        self.gate = DraftGate(self.cost) if config.adaptive else None
        self.stats = SpecStats()
        # This step's 'auto' requests drafted for, per momentum: [requests, nodes, accepted tokens, draft seconds]
        self._step: dict[int | None, list] = {}
        self._predicted: float | None = None  # seconds the controller expects this step to take
        self._trees = 0  # trees accepted this step

    def step_done(self, forward_seconds: float, other_seconds: float) -> None:
        """The engine's step has run: `other_seconds` of it outside the forward pass and drafting."""
        self.cost.observe_overhead(other_seconds, self._trees)
        self._trees = 0
        if self._predicted is not None:
            self.stats.controlled_steps += 1
            self.stats.predicted_seconds += self._predicted
            self.stats.controlled_seconds += forward_seconds + other_seconds
            self.controller.observe_step(forward_seconds + other_seconds)
            self._predicted = None

    def draft(self, reqs: Sequence[Request], max_model_len: int, other: StepWork = StepWork(),
              max_total_nodes: int | None = None) -> None:
        """Set req.draft for each decoding request (None where nothing is worth verifying).
        `other`: prefill work the step will also do (it raises the step's cost);
        `max_total_nodes`: room for draft nodes in the step, over the whole batch."""
        self._close_step()
        if not reqs:
            return
        contexts = [r.num_tokens - 1 for r in reqs]  # cached tokens: all but the root
        momenta = [momentum_bucket(r.last_accepted) for r in reqs]
        modes = [r.params.speculation for r in reqs]
        # The gate holds back "auto" requests whose drafting would not pay, without drafting
        # them, as does a step with no room for nodes; "fixed" ones speculate every step by
        # definition. Drafts already in flight are always collected: a pre-verify probe must be seen through.
        if not self.drafter.drafts_in_flight and "auto" in modes:
            if max_total_nodes == 0:
                opened = [False] * len(reqs)
            elif self.gate is not None:
                opened = self.gate.open_for(momenta, other, contexts)
            else:
                opened = [True] * len(reqs)
            modes = ["none" if m == "auto" and not o else m for m, o in zip(modes, opened)]
        if all(m == "none" for m in modes):
            for req in reqs:
                req.draft = None
            return
        start = time.perf_counter()
        # A step commits accepted nodes plus one token: never draft past max_tokens or the context.
        depth_caps = [min(r.params.max_tokens - r.num_output_tokens, max_model_len - r.num_tokens) - 1 for r in reqs]
        # With goodput control the drafter offers more candidates than will be verified: the
        # controller picks the best max_nodes of them (merged trees would otherwise be cut in
        # proposal order, one drafter crowding out the next).
        offer = self.config.max_nodes * (CANDIDATES_PER_NODE if self.controller is not None else 1)
        budgets = [offer if cap > 0 and mode != "none" else 0 for cap, mode in zip(depth_caps, modes)]
        trees = self.drafter.propose(reqs, budgets)
        trees = [t.capped(b, cap) for t, b, cap in zip(trees, budgets, depth_caps)]
        auto = [i for i, m in enumerate(modes) if m == "auto"]
        fixed = [i for i, m in enumerate(modes) if m != "auto"]  # verified whatever the gain (or none)
        if self.controller is not None:
            for i in fixed:
                if len(trees[i]) > self.config.max_nodes:
                    trees[i] = self.controller.best_nodes(trees[i], momenta[i])
        if self.controller is not None and auto:
            for i in fixed:
                other += seq_work(1 + len(trees[i]), contexts[i], 1 + len(trees[i]))
            room = None if max_total_nodes is None else max(0, max_total_nodes - sum(len(trees[i]) for i in fixed))
            chosen = self.controller.select([trees[i] for i in auto], other, [momenta[i] for i in auto], room,
                                            [contexts[i] for i in auto])
            for i, tree, expected in zip(auto, chosen, self.controller.expected):
                trees[i] = tree
                reqs[i].expected_accepted = expected if len(tree) else None
            if any(len(t) for t in chosen):
                self._predicted = self.controller.predicted_seconds
        trees = [t.pruned(self.config.max_nodes) if len(t) > self.config.max_nodes else t for t in trees]
        for req, tree in zip(reqs, trees):
            req.draft = tree if len(tree) else None
        self.drafter.verifying(reqs, trees)
        elapsed = time.perf_counter() - start
        self.stats.draft_seconds += elapsed
        # What the gate learns from this step, per momentum; drafting time is shared evenly.
        drafted = sum(b > 0 for b in budgets)
        for i in auto:
            if budgets[i] > 0:
                outcome = self._step.setdefault(momenta[i], [0, 0, 0, 0.0])
                outcome[0] += 1
                outcome[1] += len(trees[i])
                outcome[3] += elapsed / drafted

    def _close_step(self) -> None:
        """Fold the last drafted step's outcomes into the gate's estimates: per momentum, and
        pooled under None (which judges requests that have no momentum yet)."""
        if self.gate is not None and self._step:
            for momentum, outcome in self._step.items():
                if momentum is not None:
                    self.gate.record(*outcome, momentum=momentum)
            self.gate.record(*[sum(o[i] for o in self._step.values()) for i in range(4)])
        self._step = {}

    def observe_plain_steps(self, reqs: Sequence[Request], logits: torch.Tensor, tokens: Sequence[int]) -> None:
        """Decode steps without a draft still teach the drafter (an empty tree, one token each).
        logits [len(reqs), V]; a drafter that reads only the top candidates gets them from one
        top-k over the batch (per request, that top-k was half of what learning cost under load)."""
        k = self.drafter.observed_candidates
        top = top_candidates(logits, k) if k else None
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            row = TopCandidates(top[i:i + 1]) if top is not None else logits[i:i + 1]
            self.drafter.observe(req, DraftTree.empty(), row, Acceptance(tokens=[token]))

    def accept(self, req: Request, logits: torch.Tensor) -> Acceptance:
        """logits [len(draft) + 1, V] at the root and the nodes -> the tokens to commit."""
        tree = req.draft
        assert tree is not None
        result = accept(tree, logits, req.params, req.seed, root_position=req.num_tokens - 1)
        self.drafter.observe(req, tree, logits, result)
        self.stats.record(tree, result)
        self._trees += 1
        momentum = momentum_bucket(req.last_accepted)  # as when it was drafted
        if req.params.speculation == "auto" and momentum in self._step:
            self._step[momentum][2] += result.num_accepted
        if req.expected_accepted is not None:
            self.stats.expected_accepted += req.expected_accepted
            self.stats.controlled_accepted += result.num_accepted
            req.expected_accepted = None
        if self.controller is not None:
            self.controller.acceptance.record(tree, result, momentum)
        req.last_accepted = result.num_accepted
        return result

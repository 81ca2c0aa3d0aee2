"""How much to speculate: SmartSpec goodput control (Liu et al., "Optimizing Speculative
Decoding for Serving Large Language Models Using Goodput", 2024).

Goodput = expected committed tokens of the batch / predicted step time. Each step, the
drafters propose candidate trees; every candidate node gets an expected acceptance — the
product, along its path, of the learned probability that a node is accepted given that its
parent was, per (drafter, depth, sibling rank, the request's momentum) — and the controller
keeps the set of nodes across the whole batch that maximises goodput under the step-cost
model: nodes are taken in decreasing expected acceptance (a child never beats its parent) and
every prefix of that order is scored, so the "flat, then rising" cost of small batches on CPUs
is handled exactly.
When the batch is large enough that extra tokens cost real time, no node pays for itself and
the step decodes plainly: speculation falls back to none under load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.runtime.attention_groups import CALL_OVERHEAD_SCORES
from services.spec.acceptance import Acceptance
from services.spec.cost_model import StepCostModel, StepWork, decode_work
from services.spec.tree import ROOT, DraftTree


@dataclass(frozen=True)
class NodeKey:
    source: str
    depth: int
    rank: int
    momentum: int | None = None  # momentum_bucket() of the request; None pools every request


def momentum_bucket(last_accepted: int | None) -> int | None:
    """Draft tokens accepted at the request's previous verified draft, bucketed: 0 (a miss),
    1 (a short run) or 2 (a long one, e.g. inside a copied span); None before its first."""
    if last_accepted is None:
        return None
    return 0 if last_accepted == 0 else 1 if last_accepted < 4 else 2


class AcceptanceModel:
    """P(node accepted | parent accepted), learned online per (drafter, depth, sibling rank,
    momentum).

    Momentum is what the request's previous draft achieved: acceptance is bursty (a copied
    span keeps matching until it ends; free text keeps missing), so the same chain is worth
    verifying far after a long accepted run than after a miss. Conditioning on it lets the
    controller draft long inside spans and cheaply between them, instead of averaging both.

    A key's estimate is its counts smoothed towards a prior mean that is itself learned: the
    estimate one depth up (same rank), for first-depth nodes the next-better rank, and for the
    best first-depth node the estimate pooled over momenta. Deep keys are seen rarely; with a
    fixed prior their estimates — multiplied down a path — would sink far below what long
    copied spans really achieve, so they borrow from shallower ones.

    The estimates are used as they are, with no exploration bonus. Nodes still get tried where
    they cost next to nothing (a lone request on a CPU verifies 8 tokens for the price of one),
    which is where uncertain keys are learned. A bonus of 0.5 standard deviations, measured on
    HumanEval against none in one process: the same speed for a lone request (2.70x plain
    decoding both), 0.90-0.95x against 0.95x at 6 concurrent requests and 0.92x against 0.95x
    at 16. Pricing nodes with the bonus had been worse still: 16 concurrent requests verified
    nodes expected to commit 2.6x what they did.
    """

    def __init__(self, base: float = 0.25, strength: float = 4.0, max_depth: int = 16, max_rank: int = 8) -> None:
        self.base, self.strength = base, strength
        self.max_depth, self.max_rank = max_depth, max_rank
        self.counts: dict[NodeKey, list[float]] = {}  # key -> [accepted, tried]

    def key(self, tree: DraftTree, node: int, rank: int, momentum: int | None = None) -> NodeKey:
        source = tree.source[node] if tree.source else "draft"
        return NodeKey(source, min(tree.depths[node], self.max_depth), min(rank, self.max_rank), momentum)

    def probability(self, key: NodeKey, memo: dict[NodeKey, float] | None = None) -> float:
        memo = {} if memo is None else memo
        if key in memo:
            return memo[key]
        if key.depth > 1:
            prior = self.probability(NodeKey(key.source, key.depth - 1, key.rank, key.momentum), memo)
        elif key.rank > 0:
            prior = self.probability(NodeKey(key.source, 1, key.rank - 1, key.momentum), memo)
        elif key.momentum is not None:
            prior = self.probability(NodeKey(key.source, 1, 0), memo)
        else:
            prior = self.base
        accepted, tried = self.counts.get(key, (0.0, 0.0))
        memo[key] = (accepted + self.strength * prior) / (tried + self.strength)
        return memo[key]

    def gains(self, tree: DraftTree, momentum: int | None = None) -> list[float]:
        """Expected acceptance of each node: the product of conditional probabilities on its path."""
        gains: list[float] = []
        memo: dict[NodeKey, float] = {}
        for node, rank in zip(range(len(tree)), _sibling_ranks(tree)):
            parent = tree.parents[node]
            above = 1.0 if parent == ROOT else gains[parent]
            gains.append(above * self.probability(self.key(tree, node, rank, momentum), memo))
        return gains

    def record(self, tree: DraftTree, result: Acceptance, momentum: int | None = None) -> None:
        """Every node whose parent was reached was tried; the accepted ones count as accepted,
        under the request's momentum and pooled."""
        reached = {ROOT, *result.accepted_nodes}
        accepted = set(result.accepted_nodes)
        for node, rank in zip(range(len(tree)), _sibling_ranks(tree)):
            if tree.parents[node] in reached:
                for m in {momentum, None}:
                    c = self.counts.setdefault(self.key(tree, node, rank, m), [0.0, 0.0])
                    c[1] += 1
                    c[0] += node in accepted


def splits(decodes: int, tree_tokens: int, context: int) -> bool:
    """Whether draft trees of up to `tree_tokens` new tokens get an attention call of their own
    beside `decodes` one-token decodes over about `context` cached tokens: where padding the
    decodes to the trees' length would cost more scores than a call (attention_groups.py)."""
    return decodes * (tree_tokens - 1) * (context + tree_tokens) > CALL_OVERHEAD_SCORES


def _previous_siblings(tree: DraftTree) -> dict[int, int]:
    return {k: kids[i - 1] for kids in tree.children.values() for i, k in enumerate(kids) if i > 0}


def _sibling_ranks(tree: DraftTree) -> list[int]:
    ranks = [0] * len(tree)
    for kids in tree.children.values():
        for r, k in enumerate(kids):
            ranks[k] = r
    return ranks


def depth_bucket(requests: int) -> int:
    """Decoding requests in a step, bucketed by powers of two: 1, 2-3, 4-7, 8-15, 16-31, 32+."""
    return min(max(requests, 1).bit_length() - 1, 5)


class GoodputController:
    """Chooses the draft nodes a step verifies (see the module docstring).

    It also holds its own tree steps against what they took, per batch depth (depth_bucket),
    and charges a step with trees what that depth's tree steps have taken beyond the step-cost
    model: an exponential moving average of (realised - predicted) seconds, charged where it is
    positive. Under the server at 2 requests/s, tree steps beside 14-15 decodes ran 1.17-1.20x
    their predicted time while those beside 2-9 ran 1.00-1.03x: what a tree costs beside many
    decodes (more attention calls, acceptance, the drafters learning) is not all in the model's
    terms, and one correction for every depth would price a lone request's trees too dear. With
    the charge, those deep tree steps ran 1.03-1.14x their prediction (README, Serving). The
    average starts at zero and moves a tenth of the way per step, so a few slow steps at a
    shallow depth do not shut drafting there. Where the charge stops the controller from
    verifying trees it can no longer be measured, so it fades with every step at that depth
    that verified none, and the depth is tried again.
    """

    def __init__(self, cost: StepCostModel, acceptance: AcceptanceModel, max_nodes: int,
                 smoothing: float = 0.1, fade: float = 0.01) -> None:
        self.cost = cost
        self.acceptance = acceptance
        self.max_nodes = max_nodes
        self.smoothing, self.fade = smoothing, fade
        self.excess: dict[int, float] = {}  # depth bucket -> EMA of realised - predicted seconds of tree steps
        self.expected: list[float] = []  # of the last select(), per tree
        self.predicted_seconds = 0.0  # of the last select(), the surcharge included
        self._depth = 0  # bucket of the last select()
        self._charged = 0.0  # surcharge in the last select()'s prediction

    def surcharge(self, requests: int) -> float:
        """Seconds added to a step with trees beside `requests` decoding requests."""
        return max(0.0, self.excess.get(depth_bucket(requests), 0.0))

    def observe_step(self, seconds: float) -> None:
        """The step of the last select(), which verified trees, took `seconds`."""
        old = self.excess.get(self._depth, 0.0)
        self.excess[self._depth] = old + self.smoothing * (seconds - (self.predicted_seconds - self._charged) - old)

    def select(self, trees: Sequence[DraftTree], other: StepWork | int,
               momenta: Sequence[int | None] | None = None, max_total: int | None = None,
               contexts: Sequence[int] | None = None) -> list[DraftTree]:
        """Keep, across the batch, the draft nodes that maximise expected tokens per second.
        `other`: the step's work (or tokens) besides one token per decoding request of `trees`;
        `momenta`: each request's momentum_bucket(); `max_total`: most nodes over the batch;
        `contexts`: each request's cached tokens, which its root and nodes attend over."""
        contexts = contexts if contexts is not None else [0] * len(trees)
        work = decode_work(other, contexts)
        momenta = momenta if momenta is not None else [None] * len(trees)
        order = self._ranked(trees, momenta)
        expected = float(len(trees))  # each decoding request commits at least one token
        seconds = [self.cost.predict(work)]
        self._depth = depth_bucket(len(trees))
        surcharge = self.surcharge(len(trees))
        goodputs = [expected / seconds[0]]
        drafted: dict[int, int] = {}  # request -> its nodes so far
        most, longest = 0, max(contexts, default=0)
        for r, node, gain in order:
            expected += gain
            drafted[r] = drafted.get(r, 0) + 1
            most = max(most, drafted[r])
            # A node reads no more cache, but is scored against it, the root and its own path.
            work += StepWork(tokens=1, pairs=contexts[r] + 1 + trees[r].depths[node], rows=1)
            extra = StepWork(calls=int(splits(len(trees) - len(drafted), 1 + most, longest)), trees=len(drafted))
            seconds.append(self.cost.predict(work + extra) + surcharge)
            goodputs.append(expected / seconds[-1])
        if max_total is not None:
            goodputs = goodputs[:max_total + 1]
        best_m = max(range(len(goodputs)), key=goodputs.__getitem__)
        if best_m == 0 and self.excess.get(self._depth, 0.0) > 0:
            self.excess[self._depth] *= 1 - self.fade
        chosen: list[set[int]] = [set() for _ in trees]
        # What the choice was worth by the models: each request's expected accepted tokens, and the
        # step's predicted seconds (the speculator holds them against what happens).
        self.expected = [0.0] * len(trees)
        self.predicted_seconds = seconds[best_m]
        self._charged = surcharge if best_m else 0.0
        for r, node, gain in order[:best_m]:
            chosen[r].add(node)
            self.expected[r] += gain
        return [tree.subset(sorted(keep)) for tree, keep in zip(trees, chosen)]

    def best_nodes(self, tree: DraftTree, momentum: int | None = None) -> DraftTree:
        """The tree's max_nodes nodes of highest expected acceptance, whatever they cost: what a
        request that speculates a fixed amount verifies (a merged tree cut in proposal order
        would let the first drafter crowd out the rest)."""
        return tree.subset(sorted(node for _, node, _ in self._ranked([tree], [momentum])))

    def _ranked(self, trees: Sequence[DraftTree], momenta: Sequence[int | None]) -> list[tuple[int, int, float]]:
        """(request, node, expected gain) in decreasing gain, each node after its parent, at most
        max_nodes per request."""
        candidates = []  # (-expected gain, depth, request, node): a parent always comes first
        for r, (tree, momentum) in enumerate(zip(trees, momenta)):
            for node, gain in enumerate(self.acceptance.gains(tree, momentum)):
                candidates.append((-gain, tree.depths[node], r, node))
        candidates.sort()
        # Stochastic siblings were drawn in order: recursive rejection needs every earlier one kept.
        previous = [_previous_siblings(t) if t.sibling_dists is not None else {} for t in trees]
        kept: list[set[int]] = [set() for _ in trees]
        order = []
        for neg_gain, _, r, node in candidates:
            parent, before = trees[r].parents[node], previous[r].get(node)
            if (len(kept[r]) < self.max_nodes and (parent == ROOT or parent in kept[r])
                    and (before is None or before in kept[r])):
                kept[r].add(node)
                order.append((r, node, -neg_gain))
        return order


class DraftGate:
    """SmartSpec's "k = 0" decision for the drafting itself, taken per request before the
    drafter runs, for the requests of each momentum (momentum_bucket) together.

    Which nodes to verify is goodput control's choice (GoodputController prices every node
    against the step-cost model, down to none), but the drafting time comes first and is not
    in that price. So the gate only asks whether drafting pays for its own time. Where recent
    drafting for the whole batch took at most `stake` of a plain step (`auto` drafting for one
    HumanEval request takes 6%), it stays open: closing it would also starve the acceptance
    model of the outcomes it learns from (a copied span would start unseen). Where drafting
    costs more, realised gains decide, per momentum: the tokens its requests gained per
    drafted request, their drafting time and the cost of their verified nodes, against the
    tokens per second of plain decoding for the batch. A request with no momentum yet is judged
    by the outcomes of every request, pooled. A closed momentum re-opens for one probe step
    after `probe_every` closed steps, so the estimates follow the workload; each probe that
    does not re-open it doubles that wait, up to `max_probe_every`.

    Why per momentum, and a stake of 8%: at 2 requests/s on HumanEval, drafting for the whole
    batch with `auto` took 14-20% of a step (about 1 ms per request), mostly for requests whose
    last draft had missed and whose nodes the controller then mostly dropped, while requests
    inside a copied span kept gaining. One gate for the batch could only draft for all or for
    none, and with a stake of 15% it swung open and shut with the batch size.

    The earlier rule also counted the verified nodes into the stake; once a plain step got
    cheaper it closed on about half of `auto`'s steps on HumanEval (drafted share 45%, 1.50x
    plain decoding). With the stake alone, `auto` drafted on 88-89% of steps (README).
    """

    def __init__(self, cost: StepCostModel, probe_every: int = 8, smoothing: float = 0.2,
                 stake: float = 0.08, max_probe_every: int = 128) -> None:
        self.cost = cost
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.smoothing = smoothing
        self.stake = stake
        self.momenta: dict[int | None, _Outcomes] = {}

    def open_for(self, momenta: Sequence[int | None], other: StepWork | int,
                 contexts: Sequence[int] | None = None) -> list[bool]:
        """Whether to draft for each decoding request, given its momentum_bucket().
        `other`: the step's work (or tokens) besides the decoding requests' one token each;
        `contexts`: those requests' cached tokens."""
        contexts = contexts if contexts is not None else [0] * len(momenta)
        plain = decode_work(other, contexts)
        plain_time = self.cost.predict(plain)
        decision: dict[int | None, bool] = {}
        for m in dict.fromkeys(momenta):
            outcomes = self.momenta.get(m)
            group = [c for c, mm in zip(contexts, momenta) if mm == m]
            decision[m] = outcomes is None or outcomes.admit(
                self._pays(outcomes, len(momenta), plain, plain_time, group), self)
        return [decision[m] for m in momenta]

    def _pays(self, o: _Outcomes, num_requests: int, plain: StepWork, plain_time: float,
              contexts: Sequence[int]) -> bool:
        if o.draft_seconds * num_requests <= self.stake * plain_time:
            return True
        drafted = len(contexts)
        nodes = round(drafted * o.nodes)  # each scored against its request's cache, about the mean
        context = sum(contexts) / drafted
        verified = StepWork(nodes, pairs=round(nodes * (context + 2)), rows=nodes, trees=drafted,
                            calls=int(splits(num_requests - drafted, 1 + round(o.nodes), max(contexts))))
        nodes_time = self.cost.predict(plain + verified) - plain_time
        # The tokens they gain per second they add, against the batch's plain tokens per second.
        return drafted * o.gain * plain_time >= num_requests * (drafted * o.draft_seconds + nodes_time)

    def record(self, requests: int, nodes: int, accepted: int, draft_seconds: float,
               momentum: int | None = None) -> None:
        """One drafted step's requests of one momentum (None: all of them, pooled): how many were
        drafted for, the nodes verified for them, the tokens they accepted and the drafting time
        spent on them."""
        if requests == 0:
            return
        samples = (accepted / requests, nodes / requests, draft_seconds / requests)
        o = self.momenta.get(momentum)
        if o is None:
            self.momenta[momentum] = _Outcomes(*samples, wait=self.probe_every)
        else:
            o.update(samples, self.smoothing)


@dataclass
class _Outcomes:
    """Recent outcomes of drafting for the requests of one momentum, and its probe schedule."""

    gain: float  # accepted tokens per drafted request
    nodes: float  # nodes verified per drafted request
    draft_seconds: float  # drafting time per drafted request
    wait: int  # closed steps before the next probe
    closed_steps: int = 0

    def update(self, samples: tuple[float, float, float], a: float) -> None:
        self.gain = (1 - a) * self.gain + a * samples[0]
        self.nodes = (1 - a) * self.nodes + a * samples[1]
        self.draft_seconds = (1 - a) * self.draft_seconds + a * samples[2]

    def admit(self, pays: bool, gate: DraftGate) -> bool:
        if pays:
            self.closed_steps, self.wait = 0, gate.probe_every
            return True
        if self.closed_steps >= self.wait:  # a probe; if drafting still does not pay, wait longer
            self.closed_steps, self.wait = 0, min(2 * self.wait, gate.max_probe_every)
            return True
        self.closed_steps += 1
        return False

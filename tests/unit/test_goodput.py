"""Goodput control: the step-cost model and the choice of draft nodes."""

from __future__ import annotations

import pytest

from services.spec.acceptance import Acceptance
from services.spec.cost_model import StepCostModel, StepWork, seq_work
from services.spec.drafters.composite import merge_trees
from services.spec.goodput import AcceptanceModel, GoodputController
from services.spec.tree import ROOT, DraftTree


def cpu_like_cost() -> StepCostModel:
    """Flat up to 8 tokens, then linear: the shape measured on 2 CPU cores."""
    cost = StepCostModel()
    cost.calibrate(lambda n: 0.040 if n <= 8 else 0.040 + 0.0025 * (n - 8))
    return cost


def opens(gate, requests: int = 1) -> bool:
    """Whether the gate drafts for a batch of `requests` alike (no momentum yet), nothing else in the step."""
    return all(gate.open_for([None] * requests, 0))


def test_cost_model_interpolates_and_extrapolates():
    cost = cpu_like_cost()
    assert cost.predict(1) == pytest.approx(0.040)
    assert cost.predict(8) == pytest.approx(0.040)
    assert cost.predict(24) == pytest.approx(0.080)  # between the 16 and 32 samples
    assert cost.predict(128) == pytest.approx(0.040 + 0.0025 * 120)  # the last slope, extended
    cost.observe(8, 0.140)  # the machine got busier at 8 tokens
    assert cost.predict(8) == pytest.approx(0.9 * 0.040 + 0.1 * 0.140)


def test_cost_model_measures_context_reads_attention_pairs_and_logit_rows():
    """Forwards timed from known coefficients give the coefficients back; predictions then
    price a step's context and logits, and a step observed at its real work leaves the curve
    where it was."""
    per_context, per_pair, per_row = 2.5e-6, 4e-7, 9e-5

    def time_forward(seqs: int, n: int, cached: int = 0, all_logits: bool = False) -> float:
        work = StepWork()
        for _ in range(seqs):
            work += seq_work(n, cached, n if all_logits else 1)
        curve = 0.040 if work.tokens <= 8 else 0.040 + 0.0025 * (work.tokens - 8)
        return curve + per_context * work.context + per_pair * work.pairs + per_row * work.rows

    cost = StepCostModel()
    cost.measure_terms(time_forward)
    cost.calibrate(lambda n: time_forward(1, n))
    assert (cost.per_context, cost.per_pair, cost.per_row) == pytest.approx((per_context, per_pair, per_row))
    decode = StepWork()
    for _ in range(16):  # 16 requests decoding over 500 cached tokens each
        decode += seq_work(1, 500, 1)
    assert cost.predict(decode) == pytest.approx(time_forward(16, 1, 500))
    assert cost.predict(decode) > cost.predict(16) + 0.02  # the context is most of that step
    cost.observe(decode, time_forward(16, 1, 500))
    assert cost.predict(16) == pytest.approx(time_forward(1, 16) - per_pair * 136 - per_row)


def test_extra_attention_calls_and_verified_trees_are_learned_apart_from_the_curve():
    """Steps that made more than one attention call teach `per_call` what the calls cost and
    leave the token curve alone; steps that verified trees teach `per_tree` their share of
    the time after the pass, and leave the plain overhead alone."""
    cost = cpu_like_cost()
    plain = cost.predict(16)
    for _ in range(200):  # two calls a step, each extra one 20 ms
        cost.observe(StepWork(16, calls=1), plain + 0.020)
    assert cost.per_call == pytest.approx(0.020, rel=1e-3)
    assert cost.predict(16) == pytest.approx(plain)  # the one-call curve is untouched
    assert cost.predict(StepWork(16, calls=2)) == pytest.approx(plain + 0.040, rel=1e-3)
    cost.observe(StepWork(16, calls=1), plain)  # cheaper than learned: it comes down, never below 0
    assert 0 < cost.per_call < 0.020

    for _ in range(50):
        cost.observe_overhead(0.002)
    for _ in range(200):
        cost.observe_overhead(0.002 + 3 * 0.0015, trees=3)
    assert cost.overhead == pytest.approx(0.002) and cost.per_tree == pytest.approx(0.0015, rel=1e-3)
    assert cost.predict(StepWork(16, trees=2)) - cost.predict(16) == pytest.approx(0.003, rel=1e-3)


def test_splits_agrees_with_the_attention_groups_it_prices():
    """`splits` says whether trees beside decodes get a call of their own; the runner's grouping
    (plan_groups) decides it, for the cases the controller prices: one tree, the rest decodes."""
    import random

    from services.runtime.attention_groups import plan_groups
    from services.spec.goodput import splits

    rng = random.Random(0)
    for _ in range(500):
        decodes, tree_tokens, context = rng.randint(1, 40), rng.randint(2, 17), rng.randint(1, 2000)
        q = [1] * decodes + [tree_tokens]
        kv = [context + 1] * decodes + [context + tree_tokens]
        assert splits(decodes, tree_tokens, context) == (len(plan_groups(q, kv)) == 2), (decodes, tree_tokens)


def test_a_tree_beside_many_decodes_pays_for_its_own_attention_call():
    """A lone request verifies its tree in the one call it makes anyway; beside 20 decoding
    requests the same tree needs a call of its own, and where that call costs more than the
    tree is expected to gain, the controller verifies no tree at all."""
    cost = cpu_like_cost()
    cost.per_call = 0.030
    model = confident_acceptance(0.9)
    ctrl = GoodputController(cost, model, max_nodes=8)
    chain = DraftTree.chain(list(range(8)))
    [alone] = ctrl.select([chain], 0, contexts=[300])
    assert len(alone) > 0
    crowd = ctrl.select([chain] + [DraftTree.empty()] * 20, 0, contexts=[300] * 21)
    assert all(len(t) == 0 for t in crowd)
    cost.per_call = 0.0  # the same batch, calls free: the tree is worth verifying again
    assert len(ctrl.select([chain] + [DraftTree.empty()] * 20, 0, contexts=[300] * 21)[0]) > 0


def test_tree_steps_that_ran_over_their_prediction_are_charged_the_difference_at_their_depth():
    """The controller holds its tree steps against what they took, per batch depth: once trees
    beside 15 decodes have run 15 ms over, a tree worth verifying there before is not, while
    beside one decode it still is; a surcharge that is not measured again fades, so the depth
    is tried again later."""
    ctrl = GoodputController(cpu_like_cost(), confident_acceptance(0.9), max_nodes=8)
    chain = DraftTree.chain([1, 2, 3])
    deep, shallow = [chain] + [DraftTree.empty()] * 15, [chain, DraftTree.empty()]

    def verified(batch) -> int:
        return len(ctrl.select(batch, 0, contexts=[200] * len(batch))[0])

    assert verified(deep) > 0
    model = ctrl.predicted_seconds  # what the step-cost model predicts for that step
    ctrl.observe_step(model + 0.015)
    assert ctrl.surcharge(len(deep)) == pytest.approx(0.0015)  # one slow step moves it a tenth of the way
    for i in range(100):  # it keeps taking 15 ms more, give or take 2 ms
        ctrl.observe_step(model + 0.015 + (0.002 if i % 2 else -0.002))
    assert ctrl.surcharge(len(deep)) == pytest.approx(0.015, abs=0.0015)
    assert verified(deep) == 0
    assert verified(shallow) > 0 and ctrl.surcharge(len(shallow)) == 0
    fading = [verified(deep) for _ in range(300)]
    assert fading[0] == 0 and fading[-1] > 0



def test_the_draft_gate_prices_the_attention_call_its_trees_would_add():
    """One request inside a copied span among 20 decoding ones: drafting for it pays while its
    tree rides in the batch's one attention call, and not once that call costs more than the
    tree gains."""
    from services.spec.goodput import DraftGate

    def gate_with(per_call: float) -> DraftGate:
        cost = StepCostModel()
        cost.calibrate(lambda n: 0.040)  # flat: the nodes themselves are free
        cost.per_call = per_call
        gate = DraftGate(cost)
        gate.record(1, nodes=4, accepted=2, draft_seconds=0.001, momentum=2)  # dearer than the stake
        return gate

    momenta, contexts = [2] + [0] * 20, [300] * 21
    assert gate_with(0.0).open_for(momenta, 0, contexts)[0]
    assert not gate_with(0.010).open_for(momenta, 0, contexts)[0]


def test_nodes_over_a_long_context_must_earn_more_to_be_verified():
    """Each node is scored against its request's whole cache: the same draft is kept deeper for
    a request with a short context than for one with a long one."""
    cost = cpu_like_cost()
    cost.per_pair = 2e-6
    model = confident_acceptance(0.7)
    ctrl = GoodputController(cost, model, max_nodes=32)
    short, long = ctrl.select([DraftTree.chain(list(range(12)))] * 2, 0, contexts=[50, 8000])
    assert len(short) > len(long)


def confident_acceptance(p: float) -> AcceptanceModel:
    """An acceptance model that has seen nodes accepted with probability p at every depth."""
    model = AcceptanceModel()
    chain = DraftTree.chain(list(range(16)))
    for trial in range(1000):
        accepted = 16 if trial < p * 1000 else 0
        model.record(chain, Acceptance(accepted_nodes=list(range(accepted))))
    return model


def test_cheap_nodes_are_all_kept_when_acceptance_is_high():
    ctrl = GoodputController(cpu_like_cost(), confident_acceptance(0.9), max_nodes=32)
    [tree] = ctrl.select([DraftTree.chain(list(range(12)))], 0)
    assert len(tree) >= 7  # free up to the 8-token knee, and worth it beyond


def test_falls_back_to_no_speculation_under_load():
    """With 64 requests decoding, every extra token costs real time: nothing pays for itself."""
    ctrl = GoodputController(cpu_like_cost(), confident_acceptance(0.3), max_nodes=32)
    trees = ctrl.select([DraftTree.chain([1, 2, 3, 4]) for _ in range(64)], 0)
    assert all(len(t) == 0 for t in trees)


def test_prefers_likely_nodes_across_requests():
    model = AcceptanceModel()
    good, bad = DraftTree([1], [ROOT], source=["good"]), DraftTree([2], [ROOT], source=["bad"])
    for _ in range(200):
        model.record(good, Acceptance(accepted_nodes=[0]))
        model.record(bad, Acceptance(accepted_nodes=[]))
    assert model.probability(model.key(good, 0, 0)) > 0.9 > 0.1 > model.probability(model.key(bad, 0, 0))
    cost = StepCostModel()
    cost.calibrate(lambda n: 0.02 + 0.01 * n)  # a fixed overhead, then every token costs: likely nodes pay
    ctrl = GoodputController(cost, model, max_nodes=4)
    kept = ctrl.select([DraftTree([1], [ROOT], source=["good"]), DraftTree([2], [ROOT], source=["bad"])], 0)
    assert [len(t) for t in kept] == [1, 0]


def test_selection_keeps_trees_connected_and_stochastic_siblings_in_draw_order():
    import torch

    q = torch.full((8,), 1 / 8)
    tree = DraftTree([1, 2, 3, 4], [ROOT, ROOT, 0, 0], sibling_dists={ROOT: q, 0: q})
    model = AcceptanceModel()
    for _ in range(100):  # the second sibling looks better than the first
        model.record(tree, Acceptance(accepted_nodes=[1]))
    ctrl = GoodputController(cpu_like_cost(), model, max_nodes=1)
    [kept] = ctrl.select([tree], 0)
    assert kept.tokens in ([], [1])  # never sibling 2 without sibling 1


def test_a_fixed_request_verifies_its_likeliest_nodes_not_the_first_proposed():
    """'fixed' speculation keeps max_nodes nodes whatever they cost; in a merged tree the first
    drafter's nodes come first, so cutting in proposal order would drop a better second drafter."""
    model = AcceptanceModel()
    first, second = DraftTree.chain([1, 2, 3, 4]), DraftTree.chain([5, 6, 7])
    merged = merge_trees([first, second], ["ngram", "token-recycling"])
    for _ in range(200):  # the second drafter's chains are accepted, the first's never
        model.record(merged, Acceptance(accepted_nodes=[4, 5, 6]))
    ctrl = GoodputController(cpu_like_cost(), model, max_nodes=4)
    kept = ctrl.best_nodes(merged)
    assert kept.tokens == [1, 5, 6, 7] and kept.parents == [ROOT, ROOT, 1, 2]
    assert merged.pruned(4).tokens == [1, 2, 3, 4], "what proposal order would have verified"
    # Whatever they cost: the same choice where a step of any size is dear.
    dear = StepCostModel()
    dear.calibrate(lambda n: 0.02 * n)
    assert GoodputController(dear, model, max_nodes=4).best_nodes(merged).tokens == [1, 5, 6, 7]


def test_merge_trees_shares_common_paths_and_labels_sources():
    a = DraftTree.chain([5, 6, 7])
    b = DraftTree([5, 9, 6, 8], [ROOT, ROOT, 0, 2])
    m = merge_trees([a, b], ["ngram", "token-recycling"])
    assert m.tokens == [5, 6, 7, 9, 8]
    assert m.parents == [ROOT, 0, 1, ROOT, 1]
    assert m.source == ["ngram+token-recycling", "ngram+token-recycling", "ngram", "token-recycling",
                        "token-recycling"]  # agreement gets a label of its own


def test_draft_gate_closes_when_drafting_costs_more_than_it_gains_and_probes_again():
    from services.spec.goodput import DraftGate

    gate = DraftGate(cpu_like_cost(), probe_every=3)
    assert opens(gate)  # nothing known yet: draft
    for _ in range(5):  # a slow drafter (30 ms per step) that gains 0.2 tokens per step
        gate.record(requests=1, nodes=4, accepted=0.2, draft_seconds=0.030)
    assert [opens(gate) for _ in range(4)] == [False, False, False, True]  # the 4th is a probe
    gate.record(requests=1, nodes=4, accepted=0.2, draft_seconds=0.030)  # which finds no better
    assert [opens(gate) for _ in range(7)] == [False] * 6 + [True]  # so the next waits twice as long
    for _ in range(10):  # the same drafter now gains 2 tokens per step: worth it
        gate.record(requests=1, nodes=4, accepted=2.0, draft_seconds=0.030)
    assert opens(gate)
    for _ in range(10):  # and no longer: the wait for a probe starts again from probe_every
        gate.record(requests=1, nodes=4, accepted=0.2, draft_seconds=0.030)
    assert [opens(gate) for _ in range(4)] == [False, False, False, True]


def test_probes_of_a_gate_that_stays_shut_thin_out_to_the_cap():
    from services.spec.goodput import DraftGate

    gate = DraftGate(cpu_like_cost(), probe_every=2, max_probe_every=16)
    gate.record(requests=1, nodes=4, accepted=0.0, draft_seconds=0.030)
    opened = [step for step in range(200) if opens(gate)]
    assert [b - a for a, b in zip(opened, opened[1:])][:5] == [5, 9, 17, 17, 17]


def test_auto_benches_a_member_that_costs_more_than_it_gains_and_probes_it_again():
    import time as _time

    from services.spec.acceptance import Acceptance
    from services.spec.drafter import Drafter
    from services.spec.drafters.composite import CompositeDrafter

    class Fixed(Drafter):
        def __init__(self, name, token, delay):
            self.name, self.token, self.delay, self.calls = name, token, delay, 0

        def propose(self, reqs, budgets):
            self.calls += 1
            _time.sleep(self.delay)
            return [DraftTree([self.token], [ROOT]) for _ in reqs]

    good, slow = Fixed("good", 1, 0.0), Fixed("slow", 2, 0.004)
    auto = CompositeDrafter([good, slow], probe_every=4, warmup_steps=2)
    for _ in range(30):
        [tree] = auto.propose([object()], [8])
        _time.sleep(0.004)  # the rest of the step (verification)
        accepted = [i for i, s in enumerate(tree.source) if s == "good"]  # only "good" nodes are right
        auto.observe(None, tree, None, Acceptance(accepted_nodes=accepted, tokens=[1, 9]))
    assert good.calls == 30
    assert 2 < slow.calls < 15, "the slow, useless member is benched, with a probe every few steps"


def test_per_step_overhead_favours_larger_steps():
    """A fixed cost outside the forward (scheduling, sampling) is amortised by committing more
    tokens per step, so with it the controller keeps more of a chain whose continuation is likely."""
    import random

    model, rnd = AcceptanceModel(), random.Random(0)
    chain = DraftTree.chain(list(range(24)))
    for _ in range(2000):  # accepted lengths: each next token continues with probability 0.9
        n = 0
        while n < 24 and rnd.random() < 0.9:
            n += 1
        model.record(chain, Acceptance(accepted_nodes=list(range(n))))
    lean, heavy = cpu_like_cost(), cpu_like_cost()
    heavy.observe_overhead(0.030)
    kept = [len(GoodputController(c, model, max_nodes=32).select([chain], 0)[0]) for c in (lean, heavy)]
    assert 8 <= kept[0] < kept[1]


def test_cost_model_never_prices_a_count_above_a_larger_one():
    """One noisy sample must not make a size look dearer than a larger one: the controller would
    then never step at that size again, and never measure it back down."""
    cost = cpu_like_cost()
    cost.observe(4, 0.500)  # a burst of load during the one step that used 4 tokens
    assert cost.predict(4) <= cost.predict(8) == pytest.approx(0.040)
    assert cost.predict(2) <= cost.predict(4)


@pytest.mark.parametrize("nodes", [4, 8])
def test_draft_gate_leaves_cheap_drafting_on_a_lone_request_to_the_controller(nodes):
    """Little at stake (nodes in the flat part of the cost curve, next to no drafting time): a
    poor recent gain does not close the gate; the controller can still choose no nodes, and
    keeps seeing outcomes, so it notices when a copied span begins."""
    from services.spec.goodput import DraftGate

    gate = DraftGate(cpu_like_cost(), probe_every=3)
    for _ in range(5):
        gate.record(requests=1, nodes=nodes, accepted=0.0, draft_seconds=0.0005)
    assert all(opens(gate) for _ in range(6))


def test_draft_gate_closes_for_a_loaded_batch_whose_drafting_does_not_pay():
    """16 decoding requests: drafting for them takes a third of a step, and 0.1 tokens gained
    each is too little. Drafting that costs next to nothing stays open at the same gain: its
    nodes are the controller's to price (it keeps none that do not pay)."""
    from services.spec.goodput import DraftGate

    costly, cheap = DraftGate(cpu_like_cost(), probe_every=3), DraftGate(cpu_like_cost(), probe_every=3)
    for _ in range(5):
        costly.record(requests=16, nodes=64, accepted=1.6, draft_seconds=0.020)
        cheap.record(requests=16, nodes=64, accepted=1.6, draft_seconds=0.002)
    assert [opens(costly, 16) for _ in range(4)] == [False, False, False, True]
    assert all(opens(cheap, 16) for _ in range(4))


def test_draft_gate_drafts_only_for_the_momenta_that_pay():
    """16 decoding requests, drafting 1.25 ms each (a third of a step for all of them): the 8
    inside copied spans (momentum 2) gain 1.8 tokens a step each, the 8 whose last draft missed
    (momentum 0) 0.1. Only the first are drafted for; the others get a probe now and then."""
    from services.spec.goodput import DraftGate

    gate = DraftGate(cpu_like_cost(), probe_every=3)
    for _ in range(5):
        gate.record(requests=8, nodes=16, accepted=14.4, draft_seconds=0.010, momentum=2)
        gate.record(requests=8, nodes=4, accepted=0.8, draft_seconds=0.010, momentum=0)
    momenta = [2] * 8 + [0] * 8
    steps = [gate.open_for(momenta, 0) for _ in range(4)]
    assert all(all(step[:8]) for step in steps)
    assert [any(step[8:]) for step in steps] == [False, False, False, True]  # the 4th is a probe
    # In a batch of two, drafting for both takes 6% of a step: little at stake, the controller decides.
    assert gate.open_for([2, 0], 0) == [True, True]


def test_drafting_for_a_loaded_batch_at_a_seventh_of_a_step_is_not_left_to_the_controller():
    """Drafting that gains nothing: for one request it takes 6% of a step, little at stake, so
    the gate stays open; for 12 requests (0.6 ms each, 14% of a 50 ms step, as measured under
    load) the gate closes instead of drafting for every miss."""
    from services.spec.goodput import DraftGate

    lone, loaded = DraftGate(cpu_like_cost(), probe_every=3), DraftGate(cpu_like_cost(), probe_every=3)
    for _ in range(5):
        lone.record(requests=1, nodes=0, accepted=0.0, draft_seconds=0.0024)
        loaded.record(requests=12, nodes=0, accepted=0.0, draft_seconds=0.0072)
    assert all(opens(lone) for _ in range(4))
    assert [opens(loaded, 12) for _ in range(4)] == [False, False, False, True]


def test_acceptance_is_learned_per_momentum_and_pooled_for_the_unseen():
    """After long accepted runs a chain keeps matching; after misses it does not. The two are
    told apart, and a momentum never seen borrows the pooled estimate."""
    from services.spec.goodput import momentum_bucket

    model, chain = AcceptanceModel(), DraftTree.chain(list(range(8)))
    hot, cold = momentum_bucket(6), momentum_bucket(0)
    for _ in range(200):
        model.record(chain, Acceptance(accepted_nodes=list(range(8))), hot)
        model.record(chain, Acceptance(accepted_nodes=[]), cold)
    assert model.gains(chain, hot)[-1] > 0.8 and model.gains(chain, cold)[0] < 0.05
    pooled, unseen = model.gains(chain)[0], model.gains(chain, momentum_bucket(2))[0]
    assert 0.4 < pooled < 0.6 and unseen == pytest.approx(pooled, abs=0.05)


def test_auto_credits_every_drafter_that_proposed_an_accepted_node():
    from services.spec.drafters.composite import proposers_of

    m = merge_trees([DraftTree.chain([5, 6]), DraftTree.chain([5, 7])], ["ngram", "lookahead"])
    assert proposers_of(m.source[0]) == ["ngram", "lookahead"]
    assert proposers_of(m.source[1]) == ["ngram"] and proposers_of(m.source[2]) == ["lookahead"]


def test_an_untried_drafter_is_verified_where_tokens_are_free_and_not_where_they_cost():
    """Nodes are priced at their plain estimate (an untried key: the 0.25 prior). Where a node
    costs nothing it is verified, and so learned; where it costs real time it is not."""
    model = AcceptanceModel()
    untried = [DraftTree([1], [ROOT], source=["new"]) for _ in range(16)]
    assert model.probability(model.key(untried[0], 0, 0)) == pytest.approx(0.25)
    steep = StepCostModel()  # 16 decodes cost 0.26 s; a node pays for its 0.01 s only if p > 0.615
    steep.calibrate(lambda n: 0.1 + 0.010 * n, sizes=(1, 16, 32, 64))
    assert all(len(t) == 0 for t in GoodputController(steep, model, max_nodes=4).select(untried, 0))
    flat = GoodputController(cpu_like_cost(), model, max_nodes=4).select(untried[:2], 0)
    assert all(len(t) == 1 for t in flat)


def test_a_step_teaches_the_gate_per_momentum_and_pooled_for_requests_without_one():
    from services.spec.config import SpecConfig
    from services.spec.drafters.ngram import NgramDrafter
    from services.spec.speculator import Speculator

    spec = Speculator(NgramDrafter(), SpecConfig(drafter="ngram"), cpu_like_cost())
    # Last step drafted for 2 requests after a miss and 3 inside a copied span: [requests, nodes, accepted, seconds]
    spec._step = {0: [2, 4, 0, 0.002], 2: [3, 9, 6, 0.003]}
    spec._close_step()
    outcomes = spec.gate.momenta
    assert set(outcomes) == {0, 2, None}
    assert (outcomes[0].gain, outcomes[2].gain) == (0.0, 2.0)
    assert outcomes[None].gain == pytest.approx(6 / 5) and outcomes[None].nodes == pytest.approx(13 / 5)
    assert outcomes[None].draft_seconds == pytest.approx(0.005 / 5)

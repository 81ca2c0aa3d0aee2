"""Speculative decoding in the engine on a tiny random model: lossless for every drafter."""

from __future__ import annotations

import pytest
import torch

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from services.runtime.scheduler import SchedulerConfig
from services.spec.config import SpecConfig
from services.spec.drafter import Drafter
from services.spec.drafters.token_recycling import TokenRecyclingDrafter
from services.spec.registry import DRAFTERS
from services.spec.tree import ROOT, DraftTree
from tests.conftest import assert_no_leaks

# Prompts with repeats, so retrieval drafters find matches and long acceptances happen.
PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    list(range(30, 60)) + list(range(30, 40)),
    [9] * 12,
    [100, 200, 300, 100, 200],
    list(range(400, 420)),
    [1, 2, 3],
    [50, 51, 50, 51, 50, 51, 50],
    list(range(200, 260, 3)),
]


def run(engine, prompts, params):
    return [o.token_ids for o in engine.generate(prompts, params)]


def spec_config(tiny, drafter: str, **kw) -> SpecConfig:
    """Every proposed node is verified (goodput control off: its choices depend on timing, and
    losslessness must hold for any tree). Model drafters draft with the tiny model itself, so
    long acceptances happen."""
    kw.setdefault("adaptive", False)
    return SpecConfig(drafter=drafter, max_nodes=12, draft_model=str(tiny.hf_dir), **kw)


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "batch8"])
def test_greedy_equals_plain_decoding(tiny, make_engine, drafter, batched):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, speculation=spec_config(tiny, drafter))
    expected = run(plain, PROMPTS, params)
    got = run(spec, PROMPTS, params) if batched else [run(spec, [p], params)[0] for p in PROMPTS]
    assert got == expected
    assert spec.speculator.stats.drafts > 0, "the drafter should have proposed something"


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_seeded_sampling_gives_the_same_tokens_as_plain(tiny, make_engine, drafter):
    params = [SamplingParams(max_tokens=30, temperature=t, top_p=tp, seed=s, ignore_eos=True)
              for t, tp, s in [(1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 1.0, 3), (0.5, 0.5, 4)]] * 2
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, speculation=spec_config(tiny, drafter))
    assert run(spec, PROMPTS, params) == run(plain, PROMPTS, params)


class DecoyOracle(Drafter):
    """Knows the true continuation and hides it behind decoy siblings, so every accepted path
    runs through non-first children and its KV rows must be compacted."""

    name = "decoy-oracle"

    def __init__(self, truth: list[int]) -> None:
        self.truth = truth

    def propose(self, reqs, budgets):
        trees = []
        for req in reqs:
            nxt = self.truth[len(req.token_ids):len(req.token_ids) + 3]
            tokens, parents = [], []
            parent = ROOT
            for t in nxt:
                decoys = [(t + 1) % 512, (t + 2) % 512]
                for d in decoys:
                    tokens.append(d)
                    parents.append(parent)
                tokens.append(t)
                parents.append(parent)
                parent = len(tokens) - 1
            trees.append(DraftTree(tokens, parents))
        return trees


@pytest.mark.parametrize("drafter", ["auto", "self-draft"])
def test_goodput_controlled_speculation_is_lossless(tiny, make_engine, drafter):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, speculation=spec_config(tiny, drafter, adaptive=True))
    assert run(spec, PROMPTS, params) == run(plain, PROMPTS, params)


def test_the_controllers_expectations_are_counted_against_what_its_choices_did(tiny, make_engine):
    """The counters behind the controller's calibration (metrics, `bench serve`): the tokens its
    kept nodes were expected to gain and gained, and its verify steps, predicted and measured;
    'fixed' requests, which it does not choose for, add to none of them."""
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, speculation=spec_config(tiny, "ngram", adaptive=True))
    repetitive = [7, 8, 9, 10] * 6  # prompt lookup keeps finding the continuation
    spec.generate([repetitive], SamplingParams(max_tokens=40, ignore_eos=True, speculation="fixed"))
    fixed = spec.speculation_counters()
    assert fixed["drafts"] > 0 and fixed["controlled_steps"] == fixed["expected_accepted"] == 0
    spec.generate([repetitive[1:]], SamplingParams(max_tokens=40, ignore_eos=True))
    c = spec.speculation_counters()
    assert 0 < c["controlled_steps"] <= c["steps"] - fixed["steps"]
    assert c["expected_accepted"] > 0
    assert 0 < c["controlled_accepted"] <= c["accepted_tokens"] - fixed["accepted_tokens"]
    assert c["predicted_seconds"] > 0 and c["controlled_seconds"] > 0


def test_per_request_speculation_modes_change_only_the_speed(tiny, make_engine):
    """In one batch: "none" requests never draft, "fixed" ones verify the drafter's whole tree every
    step (goodput control would prune it), "auto" ones follow goodput control; all give plain tokens."""
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4,
                       speculation=spec_config(tiny, "ngram", adaptive=True))
    expected = run(plain, PROMPTS, SamplingParams(max_tokens=30, ignore_eos=True))
    modes = ["auto", "fixed", "none"] * 3
    params = [SamplingParams(max_tokens=30, ignore_eos=True, speculation=m) for m in modes[:len(PROMPTS)]]
    drafted: dict[str, int] = {m: 0 for m in modes}
    original = spec.speculator.drafter.verifying

    def count(reqs, trees):
        for req, tree in zip(reqs, trees):
            drafted[req.params.speculation] += len(tree)
        return original(reqs, trees)

    spec.speculator.drafter.verifying = count
    assert run(spec, PROMPTS, params) == expected
    assert drafted["none"] == 0 and drafted["fixed"] > 0
    with pytest.raises(ValueError, match="speculation"):
        SamplingParams(speculation="sometimes").validate()


def test_under_goodput_control_no_node_is_drafted_while_a_prompt_waits(tiny, make_engine):
    """Prefill first: a new request's first token never waits on other requests' speculation."""
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=16),
                       speculation=spec_config(tiny, "ngram", adaptive=True))
    steps: list[tuple[bool, int]] = []  # (a prompt was pending, nodes verified) per drafted step
    original = spec.speculator.drafter.verifying

    def record(reqs, trees):
        pending = any(r.num_computed_tokens < r.num_prompt_tokens for r in spec.scheduler.running)
        steps.append((pending or bool(spec.scheduler.waiting), sum(len(t) for t in trees)))
        return original(reqs, trees)

    spec.speculator.drafter.verifying = record
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    spec.add_request(PROMPTS[0], params)
    for _ in range(8):
        spec.step()
    spec.add_request(list(range(100, 160)), params)  # 60 tokens: four 16-token chunks of prefill
    while spec.has_unfinished_requests():
        spec.step()
    assert steps and not any(pending for pending, _ in steps)
    assert sum(nodes for _, nodes in steps) > 0, "drafting resumed once the prompt was in"


@pytest.mark.parametrize("drafter", ["token-recycling", "auto", "self-draft"])
def test_optional_prompt_logits_are_left_out_of_batched_steps(tiny, make_engine, drafter):
    """Token Recycling learns from prompt logits when a prompt prefills alone, not while another
    request runs beside it (the projection would slow that request); a self-draft's
    calibration needs them, so it gets them in every step."""
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=16),
                       speculation=spec_config(tiny, drafter))
    seen: list[tuple[str, bool]] = []  # per observed prompt chunk: its request, whether another decoded
    original = spec.speculator.drafter.observe_prompt

    def observe_prompt(req, start, token_ids, logits):
        others = [r for r in spec.scheduler.running if r is not req]
        seen.append((req.request_id, any(r.num_computed_tokens >= r.num_prompt_tokens for r in others)))
        return original(req, start, token_ids, logits)

    spec.speculator.drafter.observe_prompt = observe_prompt
    alone = spec.add_request(PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True))  # 40 tokens: 3 chunks
    for _ in range(5):
        spec.step()
    beside = spec.add_request(list(range(100, 140)), SamplingParams(max_tokens=4))  # while `alone` decodes
    spec.step()
    running = {r.request_id: r for r in spec.scheduler.running}
    assert alone in running and 0 < running[beside].num_computed_tokens < 40  # the overlap happened
    while spec.has_unfinished_requests():
        spec.step()
    assert [rid for rid, _ in seen[:3]] == [alone] * 3
    beside_decoded = [decoding for rid, decoding in seen if rid == beside]
    assert any(beside_decoded) == (drafter == "self-draft")


def test_accepted_path_kv_equals_sequential_kv(tiny, make_engine):
    """After tree steps with compaction, the request's cached K/V equals a plain prefill's."""
    prompt, params = PROMPTS[1], SamplingParams(max_tokens=24, ignore_eos=True)
    plain = make_engine(tiny, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    truth = prompt + plain.generate([prompt], params)[0].token_ids
    spec = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=64, block_size=4,
                                  enable_prefix_caching=False, speculation=SpecConfig(max_nodes=12, adaptive=False)),
                     loaded=tiny, drafter=DecoyOracle(truth))
    rid = spec.add_request(prompt, params)
    req = spec.requests[rid]
    for _ in range(4):
        spec.step()
    assert spec.speculator.stats.accepted_tokens >= 9, "every decoy tree should be accepted to depth 3"
    assert req.token_ids == truth[:len(req.token_ids)]
    n = req.num_computed_tokens
    pid = plain.add_request(req.token_ids[:n] + [1], SamplingParams(max_tokens=2))
    plain.step()  # prefill: computes KV for the first n + 1 tokens
    table = plain.requests[pid].block_table
    for layer in range(tiny.config.num_hidden_layers):
        for which in (0, 1):
            ours = _gather(spec.kv_cache.layers[layer][which], req.block_table, n, 4)
            ref = _gather(plain.kv_cache.layers[layer][which], table, n, 4)
            assert torch.allclose(ours, ref, atol=1e-5), f"layer {layer}, {'kv'[which]}"
    spec.abort(rid)
    plain.abort(pid)
    assert_no_leaks(spec)


def _gather(cache, table, n, bs):
    slots = torch.tensor([table[j // bs] * bs + j % bs for j in range(n)])
    return cache.view(-1, *cache.shape[2:])[slots]


def test_drafts_respect_max_tokens_and_context(tiny, make_engine):
    spec = make_engine(tiny, num_kv_blocks=64, block_size=4, max_model_len=40,
                       speculation=SpecConfig(drafter="ngram", max_nodes=12))
    params = [SamplingParams(max_tokens=5, ignore_eos=True), SamplingParams(max_tokens=50, ignore_eos=True)]
    outs = spec.generate([[7, 7, 7, 7, 7, 7], list(range(1, 30))], params)
    assert len(outs[0].token_ids) == 5 and outs[0].finish_reason == "length"
    assert len(outs[1].token_ids) == 40 - 29 and outs[1].finish_reason == "length"


def test_token_recycling_state_under_2mb_for_smollm2_vocab():
    drafter = TokenRecyclingDrafter(vocab_size=49152)
    assert drafter.state_bytes() < 2 * 1024 * 1024


def test_a_batch_of_plain_steps_teaches_token_recycling_as_steps_one_by_one():
    """Plain decode steps are observed with one top-k over the batch; the adjacency matrix must
    come out as if each request's row had been observed alone."""
    from services.runtime.request import Request
    from services.spec.acceptance import Acceptance
    from services.spec.speculator import Speculator

    torch.manual_seed(0)
    reqs = [Request(f"r{i}", [i + 1], SamplingParams(), seed=0, detokenizer=None, token_ids=[i + 1, 10 + i])
            for i in range(4)]
    logits, tokens = torch.randn(4, 64), [3, 5, 7, 9]
    batched = Speculator(TokenRecyclingDrafter(vocab_size=64), SpecConfig(drafter="token-recycling"))
    batched.observe_plain_steps(reqs, logits, tokens)
    alone = TokenRecyclingDrafter(vocab_size=64)
    for i, req in enumerate(reqs):
        alone.observe(req, DraftTree.empty(), logits[i:i + 1], Acceptance(tokens=[tokens[i]]))
    assert torch.equal(batched.drafter.adjacency, alone.adjacency)
    assert (alone.adjacency[[10, 11, 12, 13]] >= 0).all()  # every root's row was filled


def test_a_fixed_request_is_drafted_its_likeliest_nodes_within_max_nodes():
    """The speculator cuts a 'fixed' request's oversized tree by expected acceptance, not by
    proposal order (which would keep the first drafter's nodes)."""
    from services.runtime.request import Request
    from services.spec.acceptance import Acceptance
    from services.spec.drafters.composite import merge_trees
    from services.spec.speculator import Speculator

    tree = merge_trees([DraftTree.chain([1, 2, 3]), DraftTree.chain([5, 6])], ["ngram", "lookahead"])

    class Fixed(Drafter):
        name = "fixed-tree"

        def propose(self, reqs, budgets):
            return [tree for _ in reqs]

    spec = Speculator(Fixed(), SpecConfig(drafter="fixed-tree", max_nodes=2))
    for _ in range(100):  # lookahead's chain is accepted, ngram's never
        spec.controller.acceptance.record(tree, Acceptance(accepted_nodes=[3, 4]))
    req = Request("r", [7, 8], SamplingParams(max_tokens=16, speculation="fixed"), seed=0, detokenizer=None)
    spec.draft([req], max_model_len=64)
    assert req.draft is not None and req.draft.tokens == [5, 6]
    assert tree.pruned(2).tokens == [1, 2], "what proposal order would have kept"


def test_drafting_time_is_not_counted_as_fixed_step_overhead(tiny, make_engine):
    """The cost model's per-step overhead is what every step pays whatever it drafts; a slow
    drafter's time (the draft gate's to price) must not enter it, or draft nodes look cheap."""
    import time

    spec = make_engine(tiny, num_kv_blocks=128, block_size=4, speculation=spec_config(tiny, "ngram", adaptive=True))
    propose = spec.speculator.drafter.propose

    def slow_propose(reqs, budgets):
        time.sleep(0.05)
        return propose(reqs, budgets)

    spec.speculator.drafter.propose = slow_propose
    spec.speculator.gate = None  # the gate would soon stop such slow drafting
    spec.generate([list(range(1, 20))], SamplingParams(max_tokens=40, ignore_eos=True))
    assert spec.speculator.stats.draft_seconds > 0.05 * 12  # it drafted, slowly, on most steps
    assert spec.speculator.cost.overhead < 0.02


def test_engines_over_the_same_weights_share_one_step_cost_calibration(tiny, make_engine, monkeypatch):
    """Calibration times forwards for seconds on a CPU; a second engine over the same module
    adopts the first one's measurements (a copy: each learns online on its own)."""
    config = {"num_kv_blocks": 512, "block_size": 16, "speculation": SpecConfig(drafter="ngram")}
    first = make_engine(tiny, **config)
    measured = first.speculator.cost
    assert measured.seconds  # the curve, timed (or adopted from an engine earlier in the session)

    timed = []
    monkeypatch.setattr(type(first.runner), "forward", lambda self, batch: timed.append(batch))
    second = make_engine(tiny, **config)
    assert timed == [], "nothing is timed again"
    cost = second.speculator.cost
    assert cost is not measured and cost.seconds == measured.seconds
    terms = ("per_context", "per_pair", "per_row")
    assert [getattr(cost, t) for t in terms] == [getattr(measured, t) for t in terms]

"""Deployments on a real local Ray cluster (CPU, gloo pair groups): colocated against
disaggregated outputs for every kind of drafter, scaling a pool under a stream of requests, and a
worker killed mid-request. Every test ends with a leak check on every surviving worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from services.cluster.config import DeploymentConfig, PoolConfig
from services.cluster.deployment import Deployment
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.spec.registry import placement_of

PROMPTS = [list(range(20 + 3 * i, 45 + 5 * i)) for i in range(4)]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
POOL = PoolConfig(num_cpus=0)  # every worker fits on a 2-core machine


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny, tiny_dir) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), num_kv_blocks=128, block_size=4), loaded=tiny)
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture
def deploy(ray_cluster, tiny_dir):
    """Start deployments; at teardown every worker must hold no requests and no blocks."""
    started: list[Deployment] = []

    def start(mode: str, drafter: str = "none", placement: str = "auto", draft_model: bool = False,
              draft_ahead: bool = True, pre_verify: bool = True, pair_idle_timeout_s: float = 300.0,
              **pools) -> Deployment:
        own_model = drafter == "draft-model" or draft_model
        spec = SpecConfig(drafter=drafter, draft_model=str(tiny_dir) if own_model else None, placement=placement,
                          draft_ahead=draft_ahead, pre_verify=pre_verify)
        engine = EngineConfig(model=str(tiny_dir), num_kv_blocks=96, block_size=4, speculation=spec)
        pools = {stage: pools.get(stage, POOL) for stage in ("colocated", "prefill", "verify", "draft")}
        d = Deployment(DeploymentConfig(mode=mode, engine=engine, pair_idle_timeout_s=pair_idle_timeout_s, **pools))
        started.append(d)
        return d

    yield start
    for d in started:
        try:
            assert not d.has_unfinished_requests()
            for load in d.load():
                assert load.unfinished == 0 and load.used_blocks == 0, load
            for worker in d.workers():
                assert d.call(worker, "leaked_blocks") == []
        finally:
            d.shutdown()


# `auto` stands for the training-free drafters (ngram, token-recycling, aded, lookahead): it merges
# them all, inside the verify worker as each of them would run; each alone is checked against
# plain decoding in process (tests/model/test_speculative_smollm2.py).
@pytest.mark.parametrize("drafter", ["none", "auto", "draft-model", "self-draft", "easyspec"])
def test_greedy_outputs_are_identical_colocated_and_disaggregated(deploy, reference, drafter):
    colocated = deploy("colocated", drafter)
    disaggregated = deploy("disaggregated", drafter)
    assert [o.token_ids for o in colocated.generate(PROMPTS, GREEDY)] == reference
    outs = disaggregated.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert disaggregated.transfer.transfers == len(PROMPTS) and disaggregated.transfer.bytes > 0


# `auto` stands for the training-free drafters (it merges them all, Token Recycling's top-k
# observations included); EasySpec over the self-draft differs from `self-draft` only in its
# layer plan, which the unit tests cover.
@pytest.mark.parametrize("drafter,draft_model", [("draft-model", False), ("easyspec", True), ("auto", False),
                                                 ("self-draft", False)])
def test_drafters_on_a_draft_pool_give_identical_output(deploy, reference, drafter, draft_model):
    """Drafting on its own worker: the verify worker asks it for trees each step and sends back
    what was accepted (and the target's top tokens, for Token Recycling)."""
    d = deploy("disaggregated", drafter, placement="draft", draft_model=draft_model,
               verify=PoolConfig(num_cpus=0, replicas=2))
    assert set(d.pools) == {"prefill", "draft", "verify"}
    outs = d.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    (draft,) = d.workers("draft")
    name, _, drafts_ahead = d.call(draft, "describe")
    if drafter == "easyspec":  # layer-parallel drafting of a model draft: the draft model's, or the self-draft
        drafter = "draft-model" if draft_model else "self-draft"
    assert name == drafter
    assert drafts_ahead == (drafter in ("draft-model", "self-draft"))  # model drafts over a cache of their own
    stats = [d.call(w, "draft_stats") for w in d.workers("verify")]
    assert sum(s["drafted"] for s in stats) > 0
    if drafts_ahead:  # PEARL: the tiny target drafts for itself, so main paths are accepted whole
        assert sum(s["ahead_used"] for s in stats) > 0
        assert sum(s["pre_verified"] for s in stats) > 0  # a request's first draft, at least


def test_easyspec_across_two_draft_ranks_gives_identical_output(deploy, reference):
    """A draft worker of two gloo ranks (two Ray actors): each computes half of every parallel
    group's attention sublayers and an all-reduce sums them; both ranks stay in step and the
    output is the target's."""
    d = deploy("disaggregated", "easyspec", placement="draft", draft_model=True,
               draft=PoolConfig(num_cpus=0, ranks=2))
    assert [o.token_ids for o in d.generate(PROMPTS, GREEDY)] == reference
    (draft,) = d.workers("draft")
    assert d.call(draft, "world_size") == 2
    (verify,) = d.workers("verify")
    assert d.call(verify, "draft_stats")["drafted"] > 0


@pytest.mark.parametrize("pools,message", [
    ({"draft": PoolConfig(ranks=2)}, "needs drafter 'easyspec' with a draft_model"),
    ({"verify": PoolConfig(ranks=2)}, "verify.ranks must be 1"),
])
def test_only_easyspec_draft_workers_span_several_ranks(tiny_dir, pools, message):
    spec = SpecConfig(drafter="draft-model", draft_model=str(tiny_dir))
    with pytest.raises(ValueError, match=message):
        DeploymentConfig(mode="disaggregated", engine=EngineConfig(model=str(tiny_dir), speculation=spec), **pools)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "deploy" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_deployment_configs_load(path):
    config = DeploymentConfig.from_yaml(path)
    assert config.mode == "disaggregated" and "verify" in config.stages


def test_pearl_look_ahead_drafts_change_no_output(deploy, tiny, tiny_dir):
    """Seeded sampling with PEARL whole, post-verify only, and no drafting ahead gives plain
    decoding's tokens: a look-ahead draft that does not fit the sampled continuation is
    rewound, not used."""
    sampled = [SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=i) for i in range(4)]
    plain = LLMEngine(EngineConfig(model=str(tiny_dir), num_kv_blocks=128, block_size=4), loaded=tiny)
    want = [o.token_ids for o in plain.generate(PROMPTS, sampled)]
    stats = {}
    for ahead, pre in ((True, True), (True, False), (False, False)):
        d = deploy("disaggregated", "draft-model", draft_ahead=ahead, pre_verify=pre)
        assert [o.token_ids for o in d.generate(PROMPTS, sampled)] == want
        (verify,) = d.workers("verify")
        stats[ahead, pre] = d.call(verify, "draft_stats")
    for ahead in ((True, True), (True, False)):
        assert stats[ahead]["ahead_used"] > 0 and stats[ahead]["ahead_missed"] > 0
    assert stats[True, True]["pre_verified"] > 0 and stats[True, False]["pre_verified"] == 0
    assert stats[False, False]["ahead_used"] == stats[False, False]["ahead_missed"] == 0


def test_a_worker_that_fails_to_load_stops_the_whole_deployment(ray_cluster, tmp_path):
    """The pools load side by side: when one pool's worker cannot load its model, the error
    names the cause and no worker of any pool is left running."""
    before = set(map(str, ray.util.list_named_actors(all_namespaces=True)))
    engine = EngineConfig(model=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception, match="unknown model"):
        Deployment(DeploymentConfig(mode="disaggregated", engine=engine, prefill=POOL, verify=POOL))
    assert set(map(str, ray.util.list_named_actors(all_namespaces=True))) <= before


def test_placements_of_the_drafters():
    assert placement_of(SpecConfig(drafter="draft-model", draft_model="m")) == "draft"
    assert placement_of(SpecConfig(drafter="self-draft")) == "verify"  # next to the KV cache it reads
    assert placement_of(SpecConfig(drafter="self-draft", placement="draft")) == "draft"  # over a copy
    with pytest.raises(ValueError, match="nothing to place"):
        placement_of(SpecConfig(drafter="none", placement="draft"))


def test_idle_pair_groups_are_closed_on_both_sides_and_formed_again(deploy, reference):
    d = deploy("disaggregated", pair_idle_timeout_s=3.0)
    (prefill,), (verify,) = d.workers("prefill"), d.workers("verify")
    assert [o.token_ids for o in d.generate(PROMPTS[:2], GREEDY)] == reference[:2]
    assert d.call(prefill, "pair_peers") == [verify] and d.call(verify, "pair_peers") == [prefill]
    time.sleep(3.2)
    d.step()  # nothing to run; idle pairs are reaped
    assert d.call(prefill, "pair_peers") == [] and d.call(verify, "pair_peers") == []
    assert [o.token_ids for o in d.generate(PROMPTS[2:], GREEDY)] == reference[2:]
    assert d.transfer.transfers == len(PROMPTS) and d.transfer.failures == 0  # over a pair formed again


def test_streamed_deltas_add_up_to_the_final_output(deploy, reference):
    d = deploy("disaggregated")
    outs = list(d.stream(PROMPTS[0], GREEDY))
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == reference[0]
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert [o.finished for o in outs].count(True) == 1


def test_growing_and_shrinking_the_verify_pool_under_a_stream_of_requests(deploy, reference):
    d = deploy("disaggregated")
    (original,) = d.workers("verify")
    prompts = PROMPTS * 3
    finals = {}
    ids = []
    for i, prompt in enumerate(prompts):
        ids.append(d.add_request(prompt, GREEDY))
        if i == 3:
            d.scale("verify", 2)  # the prefill pool is not touched
            (added,) = set(d.workers("verify")) - {original}
        if i == 8:
            # The new worker took its share of the stream before the pool shrinks again.
            assert d.call(added, "speculation_stats")["decode_steps"] > 0
            d.scale("verify", 1)  # one worker drains: it takes nothing new, finishes what it has
            (draining,) = [r.worker_id for r in d.pools["verify"].replicas.values() if r.draining]
        for out in d.step():
            if out.finished:
                finals[out.request_id] = out
    while d.has_unfinished_requests():
        for out in d.step():
            if out.finished:
                finals[out.request_id] = out
    assert [finals[i].token_ids for i in ids] == [reference[i % len(PROMPTS)] for i in range(len(prompts))]
    assert d.workers("verify") == [w for w in (original, added) if w != draining]  # the drained one is gone
    assert len(d.workers("prefill")) == 1


def test_a_killed_verify_worker_fails_its_request_clearly_and_spares_the_others(deploy, reference):
    d = deploy("disaggregated", verify=PoolConfig(num_cpus=0, replicas=2))
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    a, b = d.add_request(PROMPTS[0], long), d.add_request(PROMPTS[1], GREEDY)
    finals = {}
    while not all(d.worker_of(r) in d.workers("verify") for r in (a, b)):  # both handed off
        for out in d.step():
            finals[out.request_id] = out
    where = {r: d.worker_of(r) for r in (a, b)}
    assert where[a] != where[b], "least-loaded routing spreads the two requests"
    ray.kill(d.pools["verify"].replicas[where[a]].handle, no_restart=True)
    while d.has_unfinished_requests():
        for out in d.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[a].finish_reason == "error" and where[a] in finals[a].error and "died" in finals[a].error
    assert finals[a].retryable  # the orchestrator may run it again elsewhere
    assert finals[b].finish_reason == "length" and finals[b].token_ids == reference[1]
    assert where[a] not in d.workers()
    # The deployment still serves, on the surviving workers.
    assert d.generate([PROMPTS[2]], GREEDY)[0].token_ids == reference[2]


def test_bad_input_is_refused_before_any_worker_holds_it(deploy):
    from services.runtime.errors import InvalidRequestError

    d = deploy("disaggregated")
    with pytest.raises(InvalidRequestError) as e:
        d.add_request([10**9], GREEDY)
    assert e.value.field == "prompt[0]"
    with pytest.raises(ValueError):
        d.add_request(PROMPTS[0], SamplingParams(max_tokens=0))
    assert not d.has_unfinished_requests()


def test_a_prompt_goes_where_its_prefix_is_cached_unless_that_worker_is_much_busier(deploy):
    d = deploy("colocated", colocated=PoolConfig(num_cpus=0, replicas=2))
    shared = list(range(100, 140))  # 10 blocks of 4 tokens
    first = d.add_request(shared + [1], SamplingParams(max_tokens=30, ignore_eos=True))
    while not d.call(d.worker_of(first), "load").running:  # prefilled: its blocks are in the prefix cache
        d.step()
    # Least-loaded routing alone would pick the idle worker; the prefix is on the busy one.
    second = d.add_request(shared + [2], GREEDY)
    assert d.worker_of(second) == d.worker_of(first)
    unrelated = d.add_request(list(range(300, 320)), GREEDY)
    assert d.worker_of(unrelated) != d.worker_of(first)  # no prefix anywhere: the least loaded
    finals = {}
    while d.has_unfinished_requests():
        for out in d.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[second].cached_prompt_tokens >= 36  # 9 full blocks came from the cache

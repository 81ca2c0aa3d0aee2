"""Model drafters: layer plans (SWIFT skips, EasySpec groups), draft-model calibration, the
layer-skip search, and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.errors import ModelLoadError
from services.runtime.kv_cache import KVCache
from services.runtime.loader import load_model
from services.runtime.model.llama import LayerPlan
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.spec.drafters.draft_model import DraftModelDrafter
from services.spec.drafters.model_draft import ModelDraftConfig, parallel_groups
from services.spec.drafters.self_draft import LayerSkipSearch, SelfDraftConfig
from tests.conftest import make_tiny_hf_dir


def manual_forward(model, ids, plan: LayerPlan) -> torch.Tensor:
    """The draft semantics written out with dense causal attention (no paging), as a reference."""
    cfg = model.config
    x = model.embed_tokens(torch.tensor(ids))
    pos = torch.arange(len(ids))
    cos, sin = model.rope(pos)

    def attn(layer, h):
        a = layer.self_attn
        t = h.shape[0]
        qkv = F.linear(h, a.qkv_proj.weight if a.qkv_proj.weight.numel() else None, a.qkv_proj.bias) \
            if a.qkv_proj.weight.numel() else a.qkv_proj(h)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], -1)
        rot = lambda z: (z * cos + torch.cat((-z.chunk(2, -1)[1], z.chunk(2, -1)[0]), -1) * sin)  # noqa: E731
        q = rot(q.view(t, a.num_heads, a.head_dim)).transpose(0, 1)
        k = rot(k.view(t, a.num_kv_heads, a.head_dim)).transpose(0, 1)
        v = v.view(t, a.num_kv_heads, a.head_dim).transpose(0, 1)
        rep = a.num_heads // a.num_kv_heads
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                           is_causal=True)
        return a.o_proj(o.transpose(0, 1).reshape(t, -1))

    groups = {g[0]: g for g in plan.parallel_groups}
    i = 0
    while i < cfg.num_hidden_layers:
        group = groups.get(i, (i,))
        h = x
        outs = {j: attn(model.layers[j], model.layers[j].input_layernorm(h)) for j in group
                if j not in plan.skip_attention}
        for j in group:
            if len(group) == 1 and j in outs:
                x = x + outs[j]
            elif j in outs:
                x = x + outs[j]
            if j not in plan.skip_mlp:
                x = x + model.layers[j].mlp(model.layers[j].post_attention_layernorm(x))
        i += len(group)
    return model.compute_logits(model.norm(x))


@pytest.mark.parametrize("plan", [
    LayerPlan(),
    LayerPlan(skip_attention=frozenset({2, 3}), skip_mlp=frozenset({1, 4})),
    LayerPlan(parallel_groups=((1, 2, 3, 4),)),
    LayerPlan(skip_attention=frozenset({2}), parallel_groups=((1, 2), (3, 4))),
], ids=["full", "swift-skips", "easyspec-4", "easyspec-2-with-skip"])
def test_layer_plans_match_the_written_out_semantics(tiny, plan):
    ids = list(range(10, 33))
    kv = KVCache.allocate(tiny.config, num_blocks=16, block_size=4, dtype=torch.float32)
    got = ModelRunner(tiny.model, kv).forward([SeqInput(ids, 0, list(range(8)), logits="all")], plan=plan).logits[0]
    with torch.inference_mode():
        want = manual_forward(tiny.model, ids, plan)
    assert torch.allclose(got, want, atol=1e-4)


def test_skipped_attention_writes_no_kv(tiny):
    kv = KVCache.allocate(tiny.config, num_blocks=16, block_size=4, dtype=torch.float32)
    ModelRunner(tiny.model, kv).forward([SeqInput(list(range(10, 20)), 0, list(range(4)))],
                                        plan=LayerPlan(skip_attention=frozenset({2})))
    assert kv.layers[2][0].abs().sum() == 0 and kv.layers[1][0].abs().sum() > 0


def test_parallel_groups_skip_first_and_last_layers():
    assert parallel_groups(10, 4) == ((1, 2, 3, 4), (5, 6, 7, 8))
    assert parallel_groups(6, 4) == ((1, 2, 3, 4),)
    assert parallel_groups(6, 1) == ()


def test_easyspec_calibration_makes_draft_kv_equal_to_a_sequential_draft(tiny, make_engine):
    """After each verification the catch-up pass rewrites the draft KV of the accepted and bonus
    tokens exactly: the draft cache then equals a sequential draft's over the committed tokens."""
    spec = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=128, block_size=4,
                                  speculation=SpecConfig(drafter="easyspec", draft_model=str(tiny.hf_dir),
                                                         parallel_group=4, adaptive=False, max_nodes=12)),
                     loaded=tiny)
    drafter = spec.speculator.drafter
    assert isinstance(drafter, DraftModelDrafter) and drafter.draft_plan.parallel_groups == ((1, 2, 3, 4),)
    rid = spec.add_request(list(range(40, 60)), SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(6):
        spec.step()
    assert spec.speculator.stats.accepted_tokens > 0
    spec.step()  # this step's catch-up calibrated everything committed before it
    req = spec.requests[rid]
    seq = drafter.seqs[rid]
    n = seq.computed
    ref_kv = KVCache.allocate(drafter.draft.config, num_blocks=32, block_size=4, dtype=torch.float32)
    ModelRunner(drafter.draft.model, ref_kv).forward([SeqInput(req.token_ids[:n], 0, list(range(32)))])
    bs = drafter.kv.block_size
    slots = torch.tensor([seq.table[j // bs] * bs + j % bs for j in range(n)])
    for layer in range(drafter.draft.config.num_hidden_layers):
        for which in (0, 1):
            ours = drafter.kv.layers[layer][which].view(-1, *ref_kv.layers[0][0].shape[2:])[slots]
            ref = ref_kv.layers[layer][which].view(-1, *ref_kv.layers[0][0].shape[2:])[:n]
            assert torch.allclose(ours, ref, atol=1e-5), f"layer {layer}"
    spec.abort(rid)
    assert not drafter.seqs and drafter.blocks.num_free_blocks == drafter.blocks.num_blocks


def test_easyspec_acceptance_is_close_to_the_sequential_draft(tiny):
    """EasySpec trades a little acceptance for parallel drafting; both stay lossless. With the
    draft equal to the target, sequential drafting's first-child path is accepted every time."""
    prompts = [list(range(40, 60)), [5, 6, 7, 8] * 4, list(range(300, 340, 2))]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    results = {}
    for group in (1, 4):
        e = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=256, block_size=4,
                                   speculation=SpecConfig(drafter="easyspec", draft_model=str(tiny.hf_dir),
                                                          parallel_group=group, adaptive=False, max_nodes=12)),
                      loaded=tiny)
        steps = []
        accept = e.speculator.accept

        def spy(req, logits, accept=accept, steps=steps):
            tree = req.draft
            result = accept(req, logits)
            first_path, node = [], -1
            while tree.children.get(node):
                node = tree.children[node][0]
                first_path.append(node)
            steps.append(result.accepted_nodes == first_path)
            return result

        e.speculator.accept = spy
        outs = [o.token_ids for o in e.generate(prompts, params)]
        results[group] = (outs, e.speculator.stats.mean_acceptance_length, steps)
    assert results[1][0] == results[4][0]
    assert all(results[1][2]) and len(results[1][2]) > 10
    assert 1 < results[4][1] <= results[1][1]


def test_sampled_proposals_record_their_distributions(tiny):
    e = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=64, block_size=4,
                               speculation=SpecConfig(drafter="draft-model", draft_model=str(tiny.hf_dir),
                                                      proposal="sample", adaptive=False)), loaded=tiny)
    rid = e.add_request(list(range(40, 60)), SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True))
    e.step()
    req = e.requests[rid]
    tree = e.speculator.drafter.propose([req], [12])[0]
    assert len(tree) > 0 and tree.sibling_dists is not None
    for parent, kids in tree.children.items():
        q = tree.sibling_dists[parent]
        assert torch.isclose(q.sum(), torch.tensor(1.0), atol=1e-4)
        assert all(q[tree.tokens[k]] > 0 for k in kids) and len({tree.tokens[k] for k in kids}) == len(kids)
    e.abort(rid)


def test_draft_model_with_another_vocabulary_is_refused(tmp_path, tiny, smollm2_dir):
    other = load_model(str(make_tiny_hf_dir(tmp_path / "v300", smollm2_dir, vocab_size=300)))
    with pytest.raises(ModelLoadError, match="share the target's tokenizer"):
        DraftModelDrafter(other, tiny.config.vocab_size, ModelDraftConfig())


def test_draft_model_drafter_needs_a_draft_model(tiny):
    from services.runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=64, block_size=4,
                               speculation=SpecConfig(drafter="draft-model")), loaded=tiny)


def test_layer_skip_search_keeps_the_best_and_stops():
    search = LayerSkipSearch(num_layers=10, config=SelfDraftConfig(max_trials=30, patience=100))
    assert search.num_skip == int(16 * 0.45) and all(0 < i < 9 for _, i in search.best)
    # Score: the more MLP sublayers skipped (attention kept), the better.
    scores = []
    for _ in range(40):
        if search.done:
            break
        cand = search.next_candidate()
        assert len(cand) == search.num_skip
        scores.append(sum(1 for kind, _ in cand if kind == "mlp") / search.num_skip)
        search.record(cand, scores[-1])
    assert search.done and search.trials == 30
    assert search.best_score == max(scores) >= 5 / 7  # random 7-of-16 sets average 0.5
    assert sum(1 for kind, _ in search.best if kind == "mlp") / search.num_skip == search.best_score


def test_self_draft_search_never_touches_the_targets_kv(tiny, make_engine):
    """Candidates are scored on scratch blocks: generation with the search running is lossless and
    the search makes progress on the requests' prompts."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [list(range(40, 80)), list(range(100, 150)), list(range(7, 60))]
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    spec = make_engine(tiny, num_kv_blocks=256, block_size=4,
                       speculation=SpecConfig(drafter="self-draft", adaptive=False, max_nodes=8))
    got = [spec.generate([p], params)[0].token_ids for p in prompts]
    assert got == [o.token_ids for o in plain.generate(prompts, params)]
    assert spec.speculator.drafter.search.trials > 0


def test_a_self_draft_over_a_copy_of_the_target_keeps_the_targets_kv_and_searches(tiny, make_engine):
    """The draft-worker self-draft: its exact catch-up pass leaves the target's KV for every
    committed token in its own cache, its search scores candidates against the target's prompt
    logits from that pass, and generation stays lossless."""
    from services.spec.drafters.self_draft import CopiedTargetSelfDrafter

    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [list(range(40, 80)), list(range(100, 150))]
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    drafter = CopiedTargetSelfDrafter(tiny, num_kv_blocks=256)
    spec = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=256, block_size=4,
                                  speculation=SpecConfig(drafter="self-draft", adaptive=False, max_nodes=8)),
                     loaded=tiny, drafter=drafter)
    rid = spec.add_request(prompts[0], params)
    for _ in range(5):
        spec.step()
    assert drafter.search.trials > 0
    req, seq = spec.requests[rid], drafter.seqs[rid]
    n = seq.computed
    ref_kv = KVCache.allocate(tiny.config, num_blocks=32, block_size=4, dtype=torch.float32)
    ModelRunner(tiny.model, ref_kv).forward([SeqInput(req.token_ids[:n], 0, list(range(32)))])  # the target's KV
    bs = drafter.kv.block_size
    slots = torch.tensor([seq.table[j // bs] * bs + j % bs for j in range(n)])
    shape = ref_kv.layers[0][0].shape[2:]
    for layer in range(tiny.config.num_hidden_layers):
        for which in (0, 1):
            ours = drafter.kv.layers[layer][which].view(-1, *shape)[slots]
            assert torch.allclose(ours, ref_kv.layers[layer][which].view(-1, *shape)[:n], atol=1e-5), f"layer {layer}"
    spec.abort(rid)
    got = [spec.generate([p], params)[0].token_ids for p in prompts]
    assert got == [o.token_ids for o in plain.generate(prompts, params)]
    assert not drafter.seqs and not drafter.prompt_targets

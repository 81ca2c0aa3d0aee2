"""Sampling with speculation keeps the target distribution, for every drafter.

A tiny model over a 16-token vocabulary; the exact joint distribution of its first three
sampled tokens (4096 sequences) is enumerated; thousands of seeded requests are generated
with each drafter; the empirical joint must match: a chi-square test on the joint (cells with
small expectation pooled) at p > 1e-3, and total variation within a bound derived from the
sample count. Deliberately biased acceptance rules must fail the same check.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.kv_cache import KVCache
from services.runtime.loader import load_model
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.sampler import target_probs
from services.runtime.sampling_params import SamplingParams
from services.runtime.scheduler import SchedulerConfig
from services.spec import acceptance
from services.spec.config import SpecConfig
from services.spec.registry import DRAFTERS
from services.spec.tree import ROOT
from tests.conftest import make_tiny_hf_dir

V, K, N = 16, 3, 4000
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
PARAMS = dict(max_tokens=K, temperature=0.9, top_p=0.95, ignore_eos=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory, smollm2_dir):
    d = make_tiny_hf_dir(tmp_path_factory.mktemp("v16"), smollm2_dir, vocab_size=V, num_hidden_layers=4,
                         seed=7)
    return load_model(str(d))


@pytest.fixture(scope="module")
def other(tmp_path_factory, smollm2_dir) -> str:
    """A different random model on the same vocabulary: a draft whose q differs from p, so
    rejections (and the residual distributions) actually happen."""
    return str(make_tiny_hf_dir(tmp_path_factory.mktemp("v16-draft"), smollm2_dir, vocab_size=V,
                                num_hidden_layers=2, seed=8))


@pytest.fixture(scope="module")
def exact(small) -> torch.Tensor:
    """P(t1, t2, t3 | prompt) for all 4096 continuations, with the request's sampling processing."""
    params = SamplingParams(**PARAMS)
    kv = KVCache.allocate(small.config, num_blocks=4096, block_size=4, dtype=torch.float32)
    runner = ModelRunner(small.model, kv)
    pairs = [(a, b) for a in range(V) for b in range(V)]
    seqs = [SeqInput(PROMPT + [a, b], 0, list(range(i * 4, i * 4 + 4)), logits="all") for i, (a, b) in
            enumerate(pairs[:256])]
    logits = runner.forward(seqs).logits  # rows: ... prompt end (-> t1), t1 (-> t2), t2 (-> t3)
    n = len(PROMPT)
    p1 = target_probs(logits[0][n - 1:n], [params])[0].double()
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    for (a, b), lg in zip(pairs, logits):
        p2 = target_probs(lg[n:n + 1], [params])[0].double()
        p3 = target_probs(lg[n + 1:n + 2], [params])[0].double()
        joint[a, b] = p1[a] * p2[b] * p3
    return joint.flatten()


def sample_joint(small, spec: SpecConfig | None, n: int = N) -> torch.Tensor:
    engine = LLMEngine(EngineConfig(model=str(small.hf_dir), num_kv_blocks=4096, block_size=4,
                                    scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=1000),
                                    speculation=spec or SpecConfig()), loaded=small)
    params = [SamplingParams(seed=s, **PARAMS) for s in range(n)]
    counts = torch.zeros(V ** K, dtype=torch.float64)
    for start in range(0, n, 1000):
        for out in engine.generate([PROMPT] * 1000, params[start:start + 1000]):
            a, b, c = out.token_ids
            counts[(a * V + b) * V + c] += 1
    if spec is not None and spec.drafter != "none":
        assert engine.speculator.stats.drafts > 0, "the drafter never proposed: nothing was tested"
    return counts


def fits(counts: torch.Tensor, p: torch.Tensor) -> tuple[bool, str]:
    n = counts.sum().item()
    if (counts[p == 0] > 0).any():
        return False, "a zero-probability sequence was generated"
    tv = 0.5 * (counts / n - p).abs().sum().item()
    # E|f_i - p_i| ~ sqrt(2 p_i (1 - p_i) / (pi n)); allow 1.5x the expected TV plus 3 std of noise.
    expected_tv = 0.5 * (torch.sqrt(2 * p * (1 - p) / (math.pi * n))).sum().item()
    tv_bound = 1.5 * expected_tv + 3 * math.sqrt(0.25 / n)
    order = torch.argsort(p, descending=True)
    big = order[(p[order] * n) >= 5]
    rest = order[(p[order] * n) < 5]
    observed = torch.cat([counts[big], counts[rest].sum().reshape(1)])
    expected = torch.cat([p[big] * n, (p[rest].sum() * n).reshape(1)])
    keep = expected > 0
    chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # chi-square 0.999 quantile
    ok = tv < tv_bound and chi2 < limit
    return ok, f"TV {tv:.4f} (bound {tv_bound:.4f}), chi2 {chi2:.1f} (limit {limit:.1f}, dof {dof})"


CASES = [(d, "top") for d in sorted(DRAFTERS)] + [("draft-model", "sample"), ("self-draft", "sample")]


@pytest.mark.parametrize("drafter,proposal", [("none", "top"), *CASES],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_sampled_tokens_follow_the_target_distribution(small, other, exact, drafter, proposal):
    spec = SpecConfig(drafter=drafter, draft_model=other, proposal=proposal, adaptive=False, max_nodes=8)
    ok, detail = fits(sample_joint(small, spec), exact)
    assert ok, detail


def _biased_step(p, q, x):
    """Residual bug: after a rejection keep drawing from p, not max(0, p - q)."""
    a, _, q_next = acceptance.rsd_step(p, q, x)
    return a, p, q_next


def _biased_point_mass(tree, logits, params, seed, root_position):
    """Point-mass bug: where the walk stops, prefer a plausible draft sibling (p > 0.1) to the
    target's own token."""
    result = acceptance.accept(tree, logits, params, seed, root_position)
    node = result.accepted_nodes[-1] if result.accepted_nodes else ROOT
    p = target_probs(logits[node + 1:node + 2], [params])[0]
    plausible = [c for c in tree.children.get(node, []) if p[tree.tokens[c]] > 0.1]
    if plausible:
        result.tokens[-1] = tree.tokens[plausible[0]]
    return result


@pytest.mark.parametrize("bug", ["rsd-residual", "point-mass"])
def test_the_check_catches_biased_acceptance(small, exact, monkeypatch, bug):
    """The self-draft's proposals are close to the target's without equal to it, so both bugs
    fire often; 3 N samples give the check the power to see them."""
    if bug == "rsd-residual":
        monkeypatch.setattr(acceptance, "recursive_rejection",
                            functools.partial(acceptance.recursive_rejection, step=_biased_step))
        spec = SpecConfig(drafter="self-draft", proposal="sample", adaptive=False, max_nodes=8)
    else:
        monkeypatch.setattr("services.spec.speculator.accept", _biased_point_mass)
        spec = SpecConfig(drafter="self-draft", adaptive=False, max_nodes=8)
    ok, detail = fits(sample_joint(small, spec, n=3 * N), exact)
    assert not ok, f"a biased rule passed the distribution check: {detail}"

"""Acceptance rules with forced logits (+-100), and their output distributions.

Greedy: the longest root path matching the target argmax, then the bonus token. Sampling:
deterministic proposals accept the child equal to the target's keyed sample; stochastic
proposals go through recursive rejection sampling (RSD). Distribution checks: exact
enumeration where the rule allows it, Monte Carlo (chi-square, TV < 3 sqrt(V/N)) elsewhere,
and a deliberately biased rule that the same check rejects.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from services.runtime.sampling_params import SamplingParams
from services.spec.acceptance import accept, recursive_rejection, rsd_step
from services.spec.drafters.token_recycling import TEMPLATE_2_2_2
from services.spec.tree import ROOT, DraftTree

V = 16
GREEDY = SamplingParams()


def forced(targets: list[int], vocab: int = V) -> torch.Tensor:
    """Logits whose argmax at row r is targets[r] (+100 there, -100 elsewhere)."""
    logits = torch.full((len(targets), vocab), -100.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 100.0
    return logits


def test_chain_all_accepted_plus_bonus():
    tree = DraftTree.chain([3, 4, 5])
    r = accept(tree, forced([3, 4, 5, 9]), GREEDY, seed=0, root_position=10)
    assert r.accepted_nodes == [0, 1, 2] and r.tokens == [3, 4, 5, 9]


def test_chain_first_position_mismatch():
    r = accept(DraftTree.chain([3, 4, 5]), forced([7, 4, 5, 9]), GREEDY, 0, 10)
    assert r.accepted_nodes == [] and r.tokens == [7]


def test_chain_middle_mismatch():
    r = accept(DraftTree.chain([3, 4, 5]), forced([3, 8, 5, 9]), GREEDY, 0, 10)
    assert r.accepted_nodes == [0] and r.tokens == [3, 8]


def test_empty_draft_gives_the_bonus_token():
    r = accept(DraftTree.empty(), forced([6]), GREEDY, 0, 10)
    assert r.tokens == [6] and r.num_accepted == 0


def test_star_accepts_the_matching_sibling():
    tree = DraftTree([1, 2, 3, 4], [ROOT] * 4)
    # rows: root, then node 0..3; the root's argmax is 3 -> node 2, whose argmax is 11
    r = accept(tree, forced([3, 0, 0, 11, 0]), GREEDY, 0, 10)
    assert r.accepted_nodes == [2] and r.tokens == [3, 11]


def test_token_recycling_template_with_random_tokens():
    g = torch.Generator().manual_seed(0)
    parents = [ROOT if len(p) == 1 else TEMPLATE_2_2_2.index(p[:-1]) for p in TEMPLATE_2_2_2]
    for _ in range(50):
        tokens = torch.randint(0, V, (len(parents),), generator=g).tolist()
        tree = DraftTree(tokens, parents)
        targets = torch.randint(0, V, (len(parents) + 1,), generator=g).tolist()
        # Make a random deep path correct, so long acceptances are exercised.
        leaf = int(torch.randint(0, len(parents), (1,), generator=g))
        node, path = leaf, []
        while node != ROOT:
            path.append(node)
            node = parents[node]
        for child in reversed(path):
            targets[parents[child] + 1] = tokens[child]
        r = accept(tree, forced(targets), GREEDY, 0, 10)
        # Reference walk, written independently of the implementation.
        expect, node = [], ROOT
        while True:
            want = targets[node + 1]
            kids = [c for c in range(len(parents)) if parents[c] == node and tokens[c] == want]
            if not kids:
                break
            node = kids[0]
            expect.append(node)
        assert r.accepted_nodes == expect
        assert r.tokens == [tokens[n] for n in expect] + [targets[(expect[-1] if expect else ROOT) + 1]]
        assert len(r.accepted_nodes) >= len(path) or tokens[path[0]] != tokens[r.accepted_nodes[0]]


def test_tree_attention_mask_and_depths():
    tree = DraftTree([1, 2, 3, 4], [ROOT, 0, ROOT, 1])
    assert tree.depths == [1, 2, 1, 3]
    m = tree.attention_mask()
    assert m[4].tolist() == [True, True, True, False, True]  # node 3 sees root, 0, 1, itself
    assert m[3].tolist() == [True, False, False, True, False]


# --- distributions --------------------------------------------------------------------------------

def _tv(freq: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (freq - p).abs().sum().item()


def _chi2_ok(counts: torch.Tensor, p: torch.Tensor, n: int) -> bool:
    """Chi-square goodness of fit at p > 1e-3 (Wilson-Hilferty approximation of the quantile)."""
    expected = p * n
    nz = expected > 0
    if (counts[~nz] > 0).any():
        return False
    chi2 = (((counts - expected) ** 2)[nz] / expected[nz]).sum().item()
    k = int(nz.sum()) - 1
    z = 3.09  # one-sided 0.999 normal quantile
    limit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return chi2 < limit


def rsd_output_pmf(p: torch.Tensor, q: torch.Tensor, m: int, step=rsd_step) -> torch.Tensor:
    """Exact output pmf of RSD with m siblings: every ordered draw without replacement from q,
    and for each, the accept / reject branches with the probabilities `step` gives."""
    out = torch.zeros(len(p), dtype=torch.float64)
    for draw in itertools.permutations([t for t in range(len(q)) if q[t] > 0], m):
        prob, rest = 1.0, q.clone()
        for x in draw:
            prob *= (rest[x] / rest.sum()).item()
            rest[x] = 0
        stay, pj, qj = prob, p, q
        for x in draw:
            a, pj_next, qj_next = step(pj, qj, x)
            out[x] += stay * a
            stay *= 1 - a
            pj, qj = pj_next, qj_next
        out += stay * pj  # every sibling rejected: draw from the last residual
    return out


def biased_step(p, q, x):
    """A classic bug: after a rejection, keep drawing from p instead of the residual max(0, p - q)."""
    a, _, q_next = rsd_step(p, q, x)
    return a, p, q_next


@pytest.mark.parametrize("case", ["random", "q_zeros", "p_zeros", "q_equals_p"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_rsd_exact_enumeration(case, m):
    g = torch.Generator().manual_seed(m)
    vocab = 6
    p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2
    q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2
    if case == "q_zeros":
        q[[0, 3]] = 0
    if case == "p_zeros":
        p[[1, 2]] = 0
    if case == "q_equals_p":
        q = p.clone()
    p, q = p / p.sum(), q / q.sum()
    if (q > 0).sum() < m:
        pytest.skip("fewer supported tokens than siblings")
    pmf = rsd_output_pmf(p, q, m)
    assert torch.allclose(pmf, p, atol=1e-6), (pmf, p)


def test_rsd_accepts_everything_when_q_equals_p():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for u in [0.01, 0.5, 0.999]:
        idx, tok = recursive_rejection([1, 0], p, p.clone(), lambda s, i, u=u: u)
        assert idx == 0 and tok == 1


def test_exact_enumeration_rejects_the_biased_rule():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert not torch.allclose(rsd_output_pmf(p, q, 1, step=biased_step), p, atol=1e-3)


def _monte_carlo(step, p, q, m, n, seed):
    """n runs of the real recursive_rejection loop on random draws and uniforms."""
    memo: dict[tuple, tuple] = {}

    def cached(pj, qj, x):  # only a few hundred distinct (p, q, x) occur: skip recomputing them
        key = (pj.numpy().tobytes(), qj.numpy().tobytes(), x)
        if key not in memo:
            memo[key] = step(pj, qj, x)
        return memo[key]

    g = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(n, 2 * m + 2, generator=g, dtype=torch.float64).tolist()
    gumbel = -torch.log(-torch.log(torch.rand(n, len(q), generator=g, dtype=torch.float64)))
    draws = (q.log().unsqueeze(0) + gumbel).topk(m, dim=1).indices.tolist()  # without replacement
    counts = torch.zeros(len(p), dtype=torch.float64)
    for us, draw in zip(uniforms, draws):
        _, tok = recursive_rejection(draw, p, q, lambda s, i, us=us: us[2 * i + s], step=cached)
        counts[tok] += 1
    return counts


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.5, 0, 0.7)])
def test_rsd_exact_with_processed_target(temperature, top_k, top_p):
    """Target distributions after temperature / top-k / top-p (zeros included), 3 siblings."""
    from services.runtime.sampler import target_probs

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 7, generator=g) * 2
    p = target_probs(logits, [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)])[0].double()
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(rsd_output_pmf(p, q, 3), p, atol=1e-6)


def test_rsd_monte_carlo():
    g = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    n = 200_000
    counts = _monte_carlo(rsd_step, p, q, 3, n, seed=11)
    assert _chi2_ok(counts, p, n)
    assert _tv(counts / n, p) < 3 * math.sqrt(8 / n)


def test_monte_carlo_rejects_the_biased_rule():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    n = 200_000
    counts = _monte_carlo(biased_step, p, q, 1, n, seed=5)
    assert not _chi2_ok(counts, p, n)


def test_point_mass_rule_distribution_and_seed_consistency():
    """Deterministic siblings: the emitted token is the target's own keyed sample, so the output
    pmf is p whatever the siblings are, and equals what plain sampling emits for the seed."""
    from services.runtime.sampler import sample

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0)
    tree = DraftTree([int(logits.argmax()), 3, 5], [ROOT, ROOT, ROOT])
    n = 20_000
    counts = torch.zeros(V, dtype=torch.float64)
    for seed in range(n):
        r = accept(tree, torch.cat([logits, torch.zeros(3, V)]), params, seed, root_position=7)
        plain = sample(logits, [params], [seed], [8])[0]
        assert r.tokens[0] == plain
        counts[r.tokens[0]] += 1
    p = torch.softmax(logits[0].double(), -1)
    assert _tv(counts / n, p) < 3 * math.sqrt(V / n)

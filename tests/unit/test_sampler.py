"""Sampling: the right distribution after temperature / top-k / top-p, keyed by (seed, position)."""

from __future__ import annotations

import math

import pytest
import torch

from services.runtime.keyed_random import keyed_uniform
from services.runtime.sampler import sample, sample_from_probs, target_probs
from services.runtime.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    got = sample(logits, [SamplingParams()] * 5, [0] * 5, [0] * 5)
    assert got == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = target_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])[0]
    assert torch.allclose(p, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), atol=1e-6)
    # top_p = 0.8: 0.5 + 0.2 < 0.8, so 0.15 is needed as well
    p = target_probs(logits, [SamplingParams(temperature=1.0, top_p=0.8)])[0]
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    p = target_probs(logits, [SamplingParams(temperature=1.0, top_p=0.01)])[0]
    assert torch.allclose(p, torch.tensor([1.0, 0, 0, 0, 0]))


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = target_probs(logits, [SamplingParams(temperature=0.5)])[0]
    assert torch.allclose(p, torch.softmax(logits[0] / 0.5, -1))


def test_inverse_cdf_draw_follows_the_distribution():
    """Monte Carlo over keyed uniforms: chi-square goodness of fit against p."""
    probs = torch.tensor([0.4, 0.0, 0.3, 0.2, 0.1, 0.0])
    n = 40_000
    u = torch.tensor([keyed_uniform(123, pos) for pos in range(n)], dtype=torch.float64)
    draws = sample_from_probs(probs.expand(n, -1), u)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0, "zero-probability tokens must never be drawn"
    expected = probs.double() * n
    nz = expected > 0
    chi2 = (((counts - expected) ** 2)[nz] / expected[nz]).sum().item()
    assert chi2 < 16.27, f"chi-square {chi2:.1f} with 3 degrees of freedom (p < 0.001)"


def test_keyed_uniforms_are_uniform_and_independent_of_call_order():
    u = [keyed_uniform(5, p) for p in range(20_000)]
    assert abs(sum(u) / len(u) - 0.5) < 0.01
    assert all(0.0 < x < 1.0 for x in u)
    assert keyed_uniform(5, 17) == u[17]
    assert keyed_uniform(5, 17) != keyed_uniform(6, 17) != keyed_uniform(5, 17, stream=1)


def test_a_row_samples_the_same_token_whatever_the_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g)
    params = [SamplingParams(temperature=t, top_p=tp, seed=None) for t, tp in
              [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0), (1.3, 0.5), (1.0, 1.0), (0.9, 1.0)]]
    seeds, positions = [11, 12, 13, 14, 15, 16], [40, 41, 42, 43, 44, 45]
    together = sample(logits, params, seeds, positions)
    alone = [sample(logits[i:i + 1], [params[i]], [seeds[i]], [positions[i]])[0] for i in range(6)]
    assert together == alone


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.2, 0, 0.8)])
def test_end_to_end_sampling_distribution(temperature, top_k, top_p):
    """Empirical frequencies of `sample` match target_probs (total variation within 3 sqrt(V/N))."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(9)) * 2
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    want = target_probs(logits, [sp])[0].double()
    n = 20_000
    got = sample(logits.expand(n, -1), [sp] * n, [77] * n, list(range(n)))
    freq = torch.bincount(torch.tensor(got), minlength=12).double() / n
    tv = 0.5 * (freq - want).abs().sum().item()
    assert tv < 3 * math.sqrt(12 / n), f"TV {tv:.4f}"
    assert (freq[want == 0] == 0).all()

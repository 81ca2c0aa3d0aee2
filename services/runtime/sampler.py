"""Turn logits into tokens: greedy, temperature, top-k, top-p, with keyed randomness.

`target_probs` is the distribution a request samples from (after temperature, top-k and
top-p); speculative verification accepts and resamples against the same distribution.
A token is drawn by inverse CDF from one keyed uniform per row, so the draw is a pure
function of (probabilities, seed, position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime.keyed_random import STREAM_SAMPLE, keyed_uniform
from services.runtime.sampling_params import SamplingParams


def target_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities of the sampling rows (temperature > 0)."""
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    logits = logits.float() / temps.unsqueeze(1)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _mask_top_k_top_p(logits, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device).unsqueeze(1)
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the shortest prefix whose mass reaches top_p: drop a token if the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, dtype=probs.dtype, device=logits.device).unsqueeze(1)
    drop |= (mass_before >= p) & (ranks > 0)
    drop_in_vocab_order = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(drop_in_vocab_order, float("-inf"))


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: [N, V] probabilities, [N] uniforms in (0, 1) -> [N] token ids."""
    cdf = probs.double().cumsum(dim=-1)  # float64: no drift over a 50k-token vocabulary
    target = uniforms.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    positions: Sequence[int],  # the position each sampled token will occupy
) -> list[int]:
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = target_probs(logits[rows], [params[i] for i in rows])
        u = torch.tensor([keyed_uniform(seeds[i], positions[i], STREAM_SAMPLE) for i in rows], dtype=torch.float64)
        tokens[rows] = sample_from_probs(probs, u.to(probs.device))
    return tokens.tolist()

"""Lossless acceptance of a draft tree against the target model's distributions.

Vocabulary: walking down from the root, a draft token the target agrees with is
*accepted*; the walk ends with one token from the target itself — the *bonus* token when
the walk stops at a node with no matching child, or the *recovered* token drawn from a
residual after rejections. Every step therefore commits at least one token.

Rules, all keeping the target distribution exactly (ALGORITHMS.md, "Verification rules"):

- Deterministic proposals (n-gram, Token Recycling, ADED, lookahead, greedy model drafts):
  the target's own token at a node is y = F_p^{-1}(u), p the target distribution there and
  u the request's keyed uniform for that position (argmax when greedy); a child is accepted
  iff its token is y. This is the point-mass rejection rule applied sibling after sibling
  on the shrinking residual — P(accept x_1) = p(x_1), P(accept x_2 | x_1 rejected) =
  p(x_2) / (1 - p(x_1)), and the final draw comes from p without the rejected siblings —
  realised with the same uniform that non-speculative sampling uses, so a seeded request
  emits exactly the tokens it would emit without speculation.
- Stochastic proposals (siblings drawn without replacement from q): recursive rejection
  sampling (Recursive Speculative Decoding, Jeon et al. 2024). Sibling j is accepted with
  probability min(1, p_j(x_j) / q_j(x_j)); on rejection p_{j+1} = norm(max(0, p_j - q_j))
  and q_{j+1} = q_j without x_j, renormalised; when every sibling is rejected the token is
  drawn from the last residual. A chain is the one-sibling case (Leviathan et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.runtime.keyed_random import STREAM_ACCEPT, STREAM_SAMPLE, keyed_uniform
from services.runtime.sampler import sample_from_probs, target_probs
from services.runtime.sampling_params import SamplingParams
from services.spec.tree import ROOT, DraftTree


@dataclass
class Acceptance:
    accepted_nodes: list[int] = field(default_factory=list)  # tree node indices, root's child first
    tokens: list[int] = field(default_factory=list)  # accepted draft tokens, then the bonus / recovered token

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


def accept(
    tree: DraftTree,
    logits: torch.Tensor,  # [n + 1, V]: target logits at the root and at every node
    params: SamplingParams,
    seed: int,
    root_position: int,  # position of the root token; the token after it is at root_position + 1
) -> Acceptance:
    """Walk the tree from the root, accepting children by the rule that fits the proposals."""
    result = Acceptance()
    node = ROOT
    while True:
        row = node + 1  # forward index of `node` (the root is row 0)
        position = root_position + (0 if node == ROOT else tree.depths[node]) + 1
        children = tree.children.get(node, [])
        if params.greedy:
            y = int(logits[row].argmax())
            nxt = next((c for c in children if tree.tokens[c] == y), None)
        elif tree.sibling_dists is None or not children:
            p = target_probs(logits[row:row + 1], [params])[0]
            u = torch.tensor([keyed_uniform(seed, position, STREAM_SAMPLE)], dtype=torch.float64)
            y = int(sample_from_probs(p.unsqueeze(0), u)[0])
            nxt = next((c for c in children if tree.tokens[c] == y), None)
        else:
            p = target_probs(logits[row:row + 1], [params])[0]
            nxt, y = recursive_rejection(
                [tree.tokens[c] for c in children], p, tree.sibling_dists[node],
                lambda stream, j, position=position: keyed_uniform(seed, position, stream, j),
            )
            nxt = None if nxt is None else children[nxt]
        if nxt is None:
            result.tokens.append(y)
            return result
        result.accepted_nodes.append(nxt)
        result.tokens.append(tree.tokens[nxt])
        node = nxt


def rsd_step(p: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One sibling x drawn from q against target p: (probability of accepting x, and the
    target and draft distributions the next sibling faces if x is rejected)."""
    qx = q[x].item()
    accept_prob = 1.0 if qx <= 0 else min(1.0, p[x].item() / qx)
    residual = (p - q).clamp(min=0)
    mass = residual.sum()
    p_next = residual / mass if mass > 0 else p  # no residual mass: x was certain under both
    q_next = q.clone()
    q_next[x] = 0
    q_mass = q_next.sum()
    return accept_prob, p_next, (q_next / q_mass if q_mass > 0 else q_next)


RsdStep = Callable[[torch.Tensor, torch.Tensor, int], tuple[float, torch.Tensor, torch.Tensor]]


def recursive_rejection(
    siblings: list[int],  # draft tokens, in the order they were drawn (without replacement) from q
    p: torch.Tensor,  # [V] target distribution
    q: torch.Tensor,  # [V] draft distribution the siblings were drawn from
    uniform: Callable[[int, int], float],  # (stream, sibling index) -> keyed uniform
    step: RsdStep = rsd_step,  # tests swap in a deliberately biased step
) -> tuple[int | None, int]:
    """RSD over one sibling group: (index of the accepted sibling or None, emitted token)."""
    p, q = p.double(), q.double()
    for j, x in enumerate(siblings):
        accept_prob, p_next, q_next = step(p, q, x)
        if uniform(STREAM_ACCEPT, j) < accept_prob:
            return j, x
        p, q = p_next, q_next
    u = torch.tensor([uniform(STREAM_SAMPLE, len(siblings))], dtype=torch.float64)
    return None, int(sample_from_probs(p.unsqueeze(0), u)[0])

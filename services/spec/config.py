"""How an engine speculates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SpecConfig:
    drafter: str = "none"
    """A drafter name (`tandem generate --drafter`); "none" decodes without speculation."""
    max_nodes: int = 32
    """Most draft nodes per request and step."""
    adaptive: bool = True
    """SmartSpec goodput control: per step, keep the draft nodes (possibly none) that maximise
    expected tokens per second under the measured step-cost curve. Off: verify every proposed
    node up to max_nodes. (On 2 CPU cores, 8 tokens cost about one decode step, 16 about 1.4.)"""
    draft_model: str | None = None
    """For `draft-model` (and `easyspec` on top of it): a smaller model with the same tokenizer."""
    parallel_group: int = 4
    """For `easyspec`: consecutive draft layers whose attention runs in parallel (EasySpec's N)."""
    placement: Literal["auto", "verify", "draft"] = "auto"
    """Disaggregated deployments: where the drafter runs. "auto": a separate draft model
    (draft-model, easyspec over one) in the draft pool; every other drafter inside the verify
    worker, next to the tree it drafts for (self-drafts read the target's own KV cache there;
    placed on a draft pool, they draft over a copy of the target and its own exact cache)."""
    draft_ahead: bool = True
    """On a draft pool, PEARL's post-verify: draft step t+1 while step t is verified, assuming
    its main path is accepted (drafters that can be rewound: draft-model, easyspec over one)."""
    pre_verify: bool = True
    """With draft_ahead, PEARL's pre-verify too: a request with no usable look-ahead decodes
    plainly while its draft is made, instead of waiting for it."""
    proposal: Literal["top", "sample"] = "top"
    """Model drafters: deterministic most-likely tokens (a seeded request then emits exactly its
    non-speculative tokens) or draws without replacement (verified by recursive rejection)."""

    def __post_init__(self) -> None:
        if self.max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, got {self.max_nodes}")
        if self.parallel_group < 1:
            raise ValueError(f"parallel_group must be >= 1, got {self.parallel_group}")
        if self.placement not in ("auto", "verify", "draft"):
            raise ValueError(f"placement must be 'auto', 'verify' or 'draft', got {self.placement!r}")
        if self.proposal not in ("top", "sample"):
            raise ValueError(f"proposal must be 'top' or 'sample', got {self.proposal!r}")

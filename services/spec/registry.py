"""Drafter names -> drafters built for an engine."""

from __future__ import annotations

from collections.abc import Callable

from services.runtime.errors import InvalidRequestError
from services.runtime.loader import load_model
from services.spec.config import SpecConfig
from services.spec.drafter import DraftContext, Drafter
from services.spec.drafters.aded import AdedDrafter
from services.spec.drafters.composite import CompositeDrafter
from services.spec.drafters.draft_model import DraftModelDrafter
from services.spec.drafters.lookahead import LookaheadDrafter
from services.spec.drafters.model_draft import ModelDraftConfig
from services.spec.drafters.ngram import NgramDrafter
from services.spec.drafters.self_draft import CopiedTargetSelfDrafter, SelfDrafter
from services.spec.drafters.token_recycling import TokenRecyclingDrafter

Factory = Callable[[DraftContext, SpecConfig], Drafter]


def _draft_model(ctx: DraftContext, spec: SpecConfig, group: int = 1) -> Drafter:
    if not spec.draft_model:
        raise InvalidRequestError("draft_model", "the draft-model drafter needs a draft model (--draft-model)")
    shard = ctx.layer_shard if group > 1 else None
    # Ranks must compute the same bits to take the same tree decisions in step: no per-process
    # kernel timing (its choice could differ between them).
    draft = load_model(spec.draft_model, ctx.dtype, ctx.device, autotune=shard is None)
    config = ModelDraftConfig(proposal=spec.proposal, parallel_group=group)
    return DraftModelDrafter(draft, ctx.config.vocab_size, config, shard=shard)


def _self_draft(ctx: DraftContext, spec: SpecConfig, group: int = 1) -> Drafter:
    config = ModelDraftConfig(proposal=spec.proposal, parallel_group=group)
    if ctx.runner is not None:  # next to the target: draft over its own KV cache
        return SelfDrafter(ctx.runner, ctx.block_manager, config)
    if ctx.target_model is None:
        raise InvalidRequestError("drafter", "a self-draft away from the target needs the target model's name")
    # On a draft worker: a copy of the target, whose exact catch-up pass keeps a cache like the target's.
    return CopiedTargetSelfDrafter(load_model(ctx.target_model, ctx.dtype, ctx.device), config)


def _easyspec(ctx: DraftContext, spec: SpecConfig) -> Drafter:
    """EasySpec layer-parallel drafting of a model draft: the draft model if one is configured,
    otherwise the self-draft."""
    build = _draft_model if spec.draft_model else _self_draft
    return build(ctx, spec, group=spec.parallel_group)


DRAFTERS: dict[str, Factory] = {
    "ngram": lambda ctx, spec: NgramDrafter(),
    "token-recycling": lambda ctx, spec: TokenRecyclingDrafter(ctx.config.vocab_size),
    "aded": lambda ctx, spec: AdedDrafter(),
    "lookahead": lambda ctx, spec: LookaheadDrafter(),
    "draft-model": _draft_model,
    "self-draft": _self_draft,
    "easyspec": _easyspec,
}
# `auto` merges the training-free drafters; goodput control picks among their nodes per step.
AUTO_MEMBERS = ("ngram", "lookahead", "token-recycling", "aded")
DRAFTERS["auto"] = lambda ctx, spec: CompositeDrafter([DRAFTERS[name](ctx, spec) for name in AUTO_MEMBERS])


def check_drafter_name(name: str) -> None:
    if name != "none" and name not in DRAFTERS:
        raise InvalidRequestError("drafter", f"unknown drafter {name!r}; expected one of {['none', *DRAFTERS]}")


def placement_of(spec: SpecConfig) -> str:
    """Where a disaggregated deployment runs the drafter: "verify" (inside the verify worker)
    or "draft" (the draft pool, which the verify worker asks for trees). "auto" keeps a
    self-draft next to the target, whose KV cache it reads; on a draft pool it drafts over a
    copy of the target instead (CopiedTargetSelfDrafter)."""
    check_drafter_name(spec.drafter)
    own_model = spec.drafter == "draft-model" or (spec.drafter == "easyspec" and spec.draft_model is not None)
    if spec.placement == "auto":
        return "draft" if own_model else "verify"
    if spec.placement == "draft" and spec.drafter == "none":
        raise InvalidRequestError("placement", "drafter 'none' has nothing to place in a draft pool")
    return spec.placement


def make_drafter(name: str, ctx: DraftContext, spec: SpecConfig) -> Drafter:
    check_drafter_name(name)
    return DRAFTERS[name](ctx, spec)

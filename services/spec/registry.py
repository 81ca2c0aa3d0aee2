"""Drafter names -> drafters built for a loaded model."""

from __future__ import annotations

from collections.abc import Callable

from services.runtime.errors import InvalidRequestError
from services.runtime.loader import LoadedModel
from services.spec.drafter import Drafter
from services.spec.drafters.aded import AdedDrafter
from services.spec.drafters.composite import CompositeDrafter
from services.spec.drafters.ngram import NgramDrafter
from services.spec.drafters.token_recycling import TokenRecyclingDrafter

DRAFTERS: dict[str, Callable[[LoadedModel], Drafter]] = {
    "ngram": lambda m: NgramDrafter(),
    "token-recycling": lambda m: TokenRecyclingDrafter(m.config.vocab_size),
    "aded": lambda m: AdedDrafter(),
}
# `auto` merges the training-free drafters; goodput control picks among their nodes per step.
AUTO_MEMBERS = ("ngram", "token-recycling")
DRAFTERS["auto"] = lambda m: CompositeDrafter([DRAFTERS[name](m) for name in AUTO_MEMBERS])


def check_drafter_name(name: str) -> None:
    if name != "none" and name not in DRAFTERS:
        raise InvalidRequestError("drafter", f"unknown drafter {name!r}; expected one of {['none', *DRAFTERS]}")


def make_drafter(name: str, model: LoadedModel) -> Drafter:
    check_drafter_name(name)
    return DRAFTERS[name](model)

"""Drafter names -> drafters built for a loaded model."""

from __future__ import annotations

from collections.abc import Callable

from services.runtime.errors import InvalidRequestError
from services.runtime.loader import LoadedModel
from services.spec.drafter import Drafter
from services.spec.drafters.ngram import NgramDrafter
from services.spec.drafters.token_recycling import TokenRecyclingDrafter

DRAFTERS: dict[str, Callable[[LoadedModel], Drafter]] = {
    "ngram": lambda m: NgramDrafter(),
    "token-recycling": lambda m: TokenRecyclingDrafter(m.config.vocab_size),
}


def make_drafter(name: str, model: LoadedModel) -> Drafter:
    if name not in DRAFTERS:
        raise InvalidRequestError("drafter", f"unknown drafter {name!r}; expected one of {['none', *DRAFTERS]}")
    return DRAFTERS[name](model)

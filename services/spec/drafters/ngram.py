"""Prompt lookup decoding (PLD): copy what followed an earlier occurrence of the last n tokens.

The last n tokens (n from `max_ngram` down to `min_ngram`) are searched in the prompt and
the generated text; the tokens that followed the earliest match are proposed as a chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.runtime.request import Request
from services.spec.drafter import Drafter
from services.spec.tree import DraftTree


@dataclass(frozen=True)
class NgramConfig:
    max_ngram: int = 3
    min_ngram: int = 1
    num_tokens: int = 16
    """Tokens copied after a match (the chain length, before the node budget)."""


def find_continuation(tokens: np.ndarray, n: int, length: int) -> list[int]:
    """Tokens following the earliest earlier occurrence of tokens[-n:], up to `length` of them."""
    if len(tokens) <= n:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # occurrences ending before the tail
    hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
    for start in hits:
        follow = tokens[start + n:start + n + length]
        if len(follow):
            return follow.tolist()
    return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        trees = []
        for req, budget in zip(reqs, budgets):
            tokens = np.asarray(req.token_ids, dtype=np.int64)
            chain: list[int] = []
            length = min(budget, self.config.num_tokens)
            if length > 0:
                for n in range(self.config.max_ngram, self.config.min_ngram - 1, -1):
                    chain = find_continuation(tokens, n, length)
                    if chain:
                        break
            trees.append(DraftTree.chain(chain))
        return trees

"""Per-request sampling parameters, validated with the offending field named."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.runtime.errors import InvalidRequestError

MAX_SEED = 2**63 - 1
SPECULATION_MODES = ("auto", "fixed", "none")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    """Most tokens to generate (the stop token counts)."""
    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""
    seed: int | None = None
    """Sampling randomness is keyed by (seed, position); None draws a seed per request."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the text is cut before the first one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    speculation: str = "auto"
    """How an engine with a drafter speculates for this request: "auto" (goodput control picks the
    draft nodes each step, possibly none), "fixed" (max_nodes of the drafter's tree every step, those
    most likely accepted) or "none" (plain decoding). Lossless either way: only speed differs."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field; token ids are range-checked given vocab_size."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"expected an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"expected a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise InvalidRequestError("seed", f"expected an integer in [0, 2^63), got {self.seed!r}")
        if self.speculation not in SPECULATION_MODES:
            raise InvalidRequestError("speculation", f"expected one of {SPECULATION_MODES}, got {self.speculation!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop[{i}]", "expected a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size and t >= vocab_size):
                raise InvalidRequestError(f"stop_token_ids[{i}]", f"expected a token id in [0, {vocab_size})")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

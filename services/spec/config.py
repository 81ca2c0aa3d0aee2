"""How an engine speculates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecConfig:
    drafter: str = "none"
    """A drafter name (`tandem generate --drafter`); "none" decodes without speculation."""
    max_nodes: int = 16
    """Most draft nodes per request and step. On 2 CPU cores a verify over 8 tokens costs about
    one decode step and 16 about 1.4 (benchmarks/results), so trees stay small there."""

    def __post_init__(self) -> None:
        if self.max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, got {self.max_nodes}")

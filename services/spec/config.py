"""How an engine speculates."""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if self.max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, got {self.max_nodes}")

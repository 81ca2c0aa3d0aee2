"""The drafter interface: propose a token tree per request; learn from each verification.

A drafter never decides correctness — verification does (acceptance.py) — so a drafter
may be stale, approximate or wrong and the output stays the target's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from services.runtime.block_manager import BlockManager
from services.runtime.loader import LoadedModel
from services.runtime.model_runner import ModelRunner
from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.tree import DraftTree


@dataclass
class DraftContext:
    """What a drafter may use of the engine it drafts for."""

    target: LoadedModel
    runner: ModelRunner  # the target's runner over its KV cache (self-drafting shares both)
    block_manager: BlockManager


class Drafter(ABC):
    name: ClassVar[str]
    wants_prompt_logits: ClassVar[bool] = False
    """Ask the engine for logits at every prompt position (Token Recycling learns from them)."""

    @abstractmethod
    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        """One tree per request with at most budgets[i] nodes; the root is req.token_ids[-1]."""

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor, result: Acceptance) -> None:
        """Right after verification, before the accepted tokens are appended (the root is still
        req.token_ids[-1]): logits [len(tree) + 1, V] at the root and every node."""

    def observe_prompt(self, req: Request, start: int, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        """After a prefill chunk of prompt tokens at positions start..., when wants_prompt_logits:
        logits [len(token_ids), V] (row i predicts position start + i + 1)."""

    def release(self, req: Request) -> None:
        """The request finished or was preempted: drop per-request state."""

    def state_bytes(self) -> int:
        """Memory the drafter keeps across requests."""
        return 0

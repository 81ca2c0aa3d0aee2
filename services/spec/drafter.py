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
import torch.nn.functional as F

from services.runtime.block_manager import BlockManager
from services.runtime.loader import LoadedModel
from services.runtime.model.llama import LayerShard
from services.runtime.model_config import ModelConfig
from services.runtime.model_runner import ModelRunner
from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.tree import DraftTree


@dataclass(frozen=True)
class TopCandidates:
    """The k most likely tokens at each position, best first: what a drafter on another worker
    gets in place of full logits (a vocabulary-wide row per node would not be worth sending)."""

    indices: torch.Tensor  # [n, k] int32

    def __len__(self) -> int:
        return self.indices.shape[0]


def top_candidates(logits: torch.Tensor | TopCandidates, k: int) -> torch.Tensor:
    """[n, k] int32 token ids, best first, from logits or from candidates kept for k or more."""
    if isinstance(logits, TopCandidates):
        if logits.indices.shape[1] < k:
            raise ValueError(f"{logits.indices.shape[1]} candidates per position kept, {k} needed")
        return logits.indices[:, :k]
    return topk_indices(logits, k).to(torch.int32)


TOPK_CHUNK = 512  # vocabulary entries per chunk in topk_indices


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[n, V] -> [n, k] indices of the k largest per row, largest first: `topk`'s answer (up to
    the order of equal values), 3-4x faster on CPU for a vocabulary-wide row. The k largest lie
    in the k chunks of TOPK_CHUNK entries with the largest maxima, so one vectorised max per
    chunk narrows the search to k chunks; `topk` over all 49152 entries took 0.30 ms for 17
    rows (a 16-node tree), this 0.08 ms (Token Recycling learns from every verify step)."""
    n, vocab = logits.shape
    chunks = -(-vocab // TOPK_CHUNK)
    if chunks < 4 * k:
        return logits.topk(k, dim=-1).indices
    padded = F.pad(logits, (0, chunks * TOPK_CHUNK - vocab), value=float("-inf")) if vocab % TOPK_CHUNK else logits
    best_chunks = padded.view(n, chunks, TOPK_CHUNK).amax(dim=-1).topk(k, dim=-1).indices  # [n, k]
    offsets = torch.arange(TOPK_CHUNK, device=logits.device)
    candidates = (best_chunks.unsqueeze(-1) * TOPK_CHUNK + offsets).view(n, k * TOPK_CHUNK)
    order = padded.gather(1, candidates).topk(k, dim=-1).indices
    return candidates.gather(1, order)


@dataclass
class DraftContext:
    """What a drafter may use of the target it drafts for. A drafter on a draft worker gets
    the target's shape only: that worker holds no target weights and no target KV cache."""

    config: ModelConfig  # the target's (its vocabulary, which every draft must share)
    dtype: torch.dtype
    device: str
    runner: ModelRunner | None = None  # the target's runner over its KV cache (self-drafting shares both)
    block_manager: BlockManager | None = None
    layer_shard: LayerShard | None = None  # this rank's share of EasySpec groups on a multi-rank draft worker
    target_model: str | None = None  # the target's name or path: a draft worker self-drafting loads a copy

    @classmethod
    def of_engine(cls, target: LoadedModel, runner: ModelRunner, block_manager: BlockManager) -> DraftContext:
        param = next(target.model.parameters())
        return cls(target.config, param.dtype, str(param.device), runner, block_manager)


class Drafter(ABC):
    name: ClassVar[str]
    wants_prompt_logits: ClassVar[bool] = False
    """Ask the engine for logits at every prompt position (Token Recycling learns from them)."""
    prompt_logits_optional: ClassVar[bool] = False
    """Prompt logits only improve this drafter's drafts (a self-draft's calibration needs them):
    the engine computes them only in steps that serve a lone request. The vocabulary projection
    of every prompt position is about a fifth of SmolLM2-135M's forward per token; in a batch it
    delays every other request's next token."""
    observed_candidates: ClassVar[int] = 0
    """How many of the target's top tokens per verified position `observe` reads (0: it reads
    no logits); a drafter on another worker is sent that many instead of the logits."""

    @abstractmethod
    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        """One tree per request with at most budgets[i] nodes; the root is req.token_ids[-1]."""

    drafts_ahead: ClassVar[bool] = False
    """Can draft from an assumed continuation and then be rewound (PEARL's post-verify): its
    per-request state is derived from req.token_ids and `rewind` undoes what it assumed."""

    @property
    def drafts_in_flight(self) -> bool:
        """Drafts asked for at an earlier step are still to be collected (PEARL on a draft pool):
        the next step must call `propose`, or they are wasted."""
        return False

    def rewind(self, req: Request, num_tokens: int) -> None:
        """Only req.token_ids[:num_tokens] still hold: forget state derived from later tokens."""

    def verifying(self, reqs: Sequence[Request], trees: Sequence[DraftTree]) -> None:
        """The trees chosen for this step's verification (after goodput selection), just
        before the target's forward pass."""

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor | TopCandidates,
                result: Acceptance) -> None:
        """Right after verification, before the accepted tokens are appended (the root is still
        req.token_ids[-1]): logits [len(tree) + 1, V] at the root and every node — or, for a
        drafter on another worker, their top `observed_candidates` tokens."""

    def observe_prompt(self, req: Request, start: int, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        """After a prefill chunk of prompt tokens at positions start..., when wants_prompt_logits:
        logits [len(token_ids), V] (row i predicts position start + i + 1)."""

    def release(self, req: Request) -> None:
        """The request finished or was preempted: drop per-request state."""

    def state_bytes(self) -> int:
        """Memory the drafter keeps across requests."""
        return 0

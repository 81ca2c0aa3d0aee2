"""What crosses between a verify worker and its draft worker: token ids, trees and top-k
candidates — plain data, a few hundred bytes per request and step.

Every message carries the request's tokens from `start` on — those the verify worker has not
sent before — so the draft worker's copy of the request is the verify worker's at the moment
the message describes (drafters read `req.token_ids`). The copy may run ahead of that with
tokens the draft worker was told to assume (PEARL); a message that contradicts them rewinds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.sampling_params import SamplingParams
from services.spec.acceptance import Acceptance
from services.spec.drafter import TopCandidates
from services.spec.tree import DraftTree


@dataclass(frozen=True)
class RequestSync:
    request_id: str
    start: int  # position of new_tokens[0] in the request's tokens
    new_tokens: list[int]  # the request's tokens from `start` (the prompt and more, on the first)
    num_prompt_tokens: int
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class ProposeItem:
    sync: RequestSync
    budget: int


@dataclass(frozen=True)
class ObserveItem:
    sync: RequestSync
    tree: DraftTree  # the tree that was verified (possibly a subset of the proposal), or empty
    candidates: TopCandidates | None  # the target's top tokens at the root and every node
    result: Acceptance


@dataclass(frozen=True)
class ReleaseItem:
    request_id: str

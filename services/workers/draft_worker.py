"""The draft stage: a drafter on its own worker (its own devices, its own draft KV cache),
proposing trees for the requests of the verify workers attached to it.

It keeps a copy of each request — token ids, parameters, seed — built from the messages
(draft_messages.py), which is all a drafter reads of a request; a draft model's KV cache
lives here, not on the verify worker. The drafter is the one the engine config names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime.engine import EngineConfig
from services.runtime.loader import hf_directory
from services.runtime.model_config import ModelConfig
from services.runtime.request import Request
from services.spec.drafter import DraftContext
from services.spec.registry import make_drafter
from services.spec.tree import DraftTree
from services.workers.draft_messages import ObserveItem, ProposeItem, ReleaseItem, RequestSync
from services.workers.load import WorkerLoad


class DraftWorker:
    stage = "draft"

    def __init__(self, worker_id: str, config: EngineConfig, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        spec = config.speculation
        # The target's config gives the vocabulary a draft must share; its weights stay on the verify workers.
        _, target_dir = hf_directory(config.model)
        target = DraftContext(ModelConfig.from_json_file(target_dir / "config.json"), config.torch_dtype,
                              config.device)
        self.drafter = make_drafter(spec.drafter, target, spec)
        self.requests: dict[str, Request] = {}
        self.proposals = 0
        self.ahead_proposals = 0

    def ready(self) -> str:
        return self.worker_id

    def describe(self) -> tuple[str, int, bool]:
        """The drafter's name, how many top candidates per position its observe reads, and
        whether it can draft ahead (PEARL)."""
        return self.drafter.name, self.drafter.observed_candidates, self.drafter.drafts_ahead

    def propose(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem]) -> list[DraftTree]:
        self.apply(queued)
        reqs = [self._synced(item.sync) for item in items]
        self.proposals += 1
        return self.drafter.propose(reqs, [item.budget for item in items])

    def propose_ahead(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem],
                      chains: Sequence[list[int]]) -> list[DraftTree]:
        """PEARL post-verify: draft as if each request's chain were already accepted. The
        copies keep the assumed tokens until a message says otherwise (see _synced)."""
        if not self.drafter.drafts_ahead:
            raise ValueError(f"{self.drafter.name} cannot draft ahead (it cannot be rewound)")
        self.apply(queued)
        reqs = [self._synced(item.sync) for item in items]
        for req, chain in zip(reqs, chains):
            req.token_ids.extend(chain)
        self.ahead_proposals += 1
        return self.drafter.propose(reqs, [item.budget for item in items])

    def apply(self, queued: Sequence[ObserveItem | ReleaseItem]) -> None:
        for item in queued:
            if isinstance(item, ReleaseItem):
                req = self.requests.pop(item.request_id, None)
                if req is not None:
                    self.drafter.release(req)
            else:
                req = self._synced(item.sync)
                self.drafter.observe(req, item.tree, item.candidates, item.result)

    def _synced(self, sync: RequestSync) -> Request:
        """The request's copy brought up to the message. Tokens the copy assumed (drafting
        ahead) stay while the message agrees with them; from the first disagreement on they
        are dropped and the drafter rewound."""
        req = self.requests.get(sync.request_id)
        if req is None:
            if sync.start != 0:
                raise ValueError(f"request {sync.request_id!r}: first message starts at token {sync.start}, not 0")
            prompt = sync.new_tokens[:sync.num_prompt_tokens]
            # No detokenizer: a drafter reads token ids only.
            req = self.requests[sync.request_id] = Request(sync.request_id, prompt, sync.params, sync.seed,
                                                           detokenizer=None)
            req.token_ids.extend(sync.new_tokens[sync.num_prompt_tokens:])
            return req
        tokens = req.token_ids
        if sync.start > len(tokens):
            raise ValueError(f"request {sync.request_id!r}: message starts at token {sync.start}, "
                             f"the copy holds {len(tokens)}")
        assumed = tokens[sync.start:]
        common = 0
        while common < min(len(assumed), len(sync.new_tokens)) and assumed[common] == sync.new_tokens[common]:
            common += 1
        if common < min(len(assumed), len(sync.new_tokens)):  # an assumption failed
            del tokens[sync.start + common:]
            self.drafter.rewind(req, len(tokens))
        tokens.extend(sync.new_tokens[len(tokens) - sync.start:])
        return req

    def load(self) -> WorkerLoad:
        blocks = getattr(self.drafter, "blocks", None)  # a draft model's own KV cache
        used = blocks.num_used_blocks if blocks is not None else 0
        free = blocks.num_free_blocks if blocks is not None else 0
        return WorkerLoad(self.worker_id, self.stage, running=len(self.requests), waiting=0, queued_tokens=0,
                          used_blocks=used, free_blocks=free)

    def leaked_blocks(self) -> list[int]:
        """Draft KV blocks held although no request is here (should be none)."""
        blocks = getattr(self.drafter, "blocks", None)
        if self.requests or blocks is None:
            return []
        return [b.block_id for b in blocks.blocks if b.ref_count]

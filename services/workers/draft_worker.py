"""The draft stage: a drafter on its own worker (its own devices, its own draft KV cache),
proposing trees for the requests of the verify workers attached to it.

It keeps a copy of each request — token ids, parameters, seed — built from the messages
(draft_messages.py), which is all a drafter reads of a request; a draft model's KV cache
lives here, not on the verify worker. The drafter is the one the engine config names.

EasySpec across ranks: a draft worker may span several processes (devices), rank 0 being
the actor the verify workers call and the others its followers. Rank 0 forms one process
group with them and repeats every call that changes drafter state on each follower; every
rank runs the same drafter on the same inputs (SPMD), each computes its share of a parallel
group's attention sublayers, and an all-reduce sums them (LayerShard), so all ranks reach
the same tree in step. Each rank holds the whole (small) draft model and its own draft KV;
the exact catch-up pass — the calibration — runs on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch

from services.runtime.engine import EngineConfig
from services.runtime.loader import hf_directory
from services.runtime.model.llama import LayerShard
from services.runtime.model_config import ModelConfig
from services.runtime.request import Request
from services.spec.drafter import DraftContext
from services.spec.registry import make_drafter
from services.spec.tree import DraftTree
from services.transfer.pair_group import backend_for
from services.transfer.rank_group import RankGroup, host_store
from services.workers.draft_messages import ObserveItem, ProposeItem, ReleaseItem, RequestSync
from services.workers.load import WorkerLoad
from services.workers.tracing import WorkerTracer, traced


class DraftWorker:
    stage = "draft"

    def __init__(self, worker_id: str, config: EngineConfig, torch_threads: int = 1,
                 followers: Sequence[ray.actor.ActorHandle] = (), follower: bool = False) -> None:
        """Rank 0 gets its `followers` (started with `follower=True`, which wait for `join_ranks`)."""
        torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.tracer = WorkerTracer(worker_id, self.stage)
        self.config = config
        self.followers = list(followers)
        self.ranks: RankGroup | None = None
        self.requests: dict[str, Request] = {}
        self.proposals = 0
        self.ahead_proposals = 0
        if follower:
            return  # the drafter is built once the rank group is formed
        if self.followers:
            store, address = host_store()
            world = len(self.followers) + 1
            joined = [f.join_ranks.remote(self.worker_id, address, rank, world)
                      for rank, f in enumerate(self.followers, start=1)]
            self._form_ranks(self.worker_id, address, 0, world, store)
            ray.get(joined)
        else:
            self._build_drafter()

    def join_ranks(self, group: str, address: str, rank: int, world: int) -> None:
        """A follower's part in forming the rank group `group` (rank 0's id; rank 0 calls this)."""
        self._form_ranks(group, address, rank, world)

    def _form_ranks(self, group: str, address: str, rank: int, world: int, store=None) -> None:
        self.ranks = RankGroup.join(group, address, rank, world, backend_for(self.config.device), store=store)
        self._build_drafter(LayerShard(rank, world, self.ranks.all_reduce))

    def _build_drafter(self, shard: LayerShard | None = None) -> None:
        config, spec = self.config, self.config.speculation
        # The target's config gives the vocabulary a draft must share; its weights stay on the verify
        # workers, unless the drafter is a self-draft, which loads a copy.
        _, target_dir = hf_directory(config.model)
        target = DraftContext(ModelConfig.from_json_file(target_dir / "config.json"), config.torch_dtype,
                              config.device, layer_shard=shard, target_model=config.model)
        self.drafter = make_drafter(spec.drafter, target, spec)

    def ready(self) -> str:
        return self.worker_id

    def world_size(self) -> int:
        return self.ranks.world if self.ranks is not None else 1

    def _on_every_rank(self, method: str, *args):
        """Run a state-changing call here and on every follower, in the same order on each
        (their collectives meet); the followers' results equal this one's."""
        pending = [getattr(f, method).remote(*args) for f in self.followers]
        result = getattr(self, f"_{method}")(*args)
        ray.get(pending)
        return result

    def describe(self) -> tuple[str, int, bool]:
        """The drafter's name, how many top candidates per position its observe reads, and
        whether it can draft ahead (PEARL)."""
        return self.drafter.name, self.drafter.observed_candidates, self.drafter.drafts_ahead

    @traced("tandem.draft.propose")
    def propose(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem]) -> list[DraftTree]:
        return self._on_every_rank("propose", queued, items)

    @traced("tandem.draft.propose_ahead")
    def propose_ahead(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem],
                      chains: Sequence[list[int]]) -> list[DraftTree]:
        return self._on_every_rank("propose_ahead", queued, items, chains)

    def apply(self, queued: Sequence[ObserveItem | ReleaseItem]) -> None:
        self._on_every_rank("apply", queued)

    def flush_traces(self) -> bool:
        return self.tracer.flush()

    def _propose(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem]) -> list[DraftTree]:
        self._apply(queued)
        reqs = [self._synced(item.sync) for item in items]
        self.proposals += 1
        return self.drafter.propose(reqs, [item.budget for item in items])

    def _propose_ahead(self, queued: Sequence[ObserveItem | ReleaseItem], items: Sequence[ProposeItem],
                       chains: Sequence[list[int]]) -> list[DraftTree]:
        """PEARL post-verify: draft as if each request's chain were already accepted. The
        copies keep the assumed tokens until a message says otherwise (see _synced)."""
        if not self.drafter.drafts_ahead:
            raise ValueError(f"{self.drafter.name} cannot draft ahead (it cannot be rewound)")
        self._apply(queued)
        reqs = [self._synced(item.sync) for item in items]
        for req, chain in zip(reqs, chains):
            req.token_ids.extend(chain)
        self.ahead_proposals += 1
        return self.drafter.propose(reqs, [item.budget for item in items])

    def _apply(self, queued: Sequence[ObserveItem | ReleaseItem]) -> None:
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
        """Draft KV blocks held although no request is here (should be none), on any rank."""
        blocks = getattr(self.drafter, "blocks", None)
        leaked = [] if self.requests or blocks is None else [b.block_id for b in blocks.blocks if b.ref_count]
        return leaked + [b for f in self.followers for b in ray.get(f.leaked_blocks.remote())]

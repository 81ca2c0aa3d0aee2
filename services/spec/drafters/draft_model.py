"""`draft-model`: a smaller model with the target's vocabulary drafts a dynamic tree.

The draft model keeps its own paged KV cache and block table per request. Each step first
catches the draft up with the tokens committed since its last step — the accepted tokens
and the bonus token — in one exact, layer-sequential pass, whose last logits start the new
tree. That pass is also EasySpec's "bonus calibration": whatever approximate KV the
layer-parallel tree passes wrote for those positions is rewritten exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.runtime.block_manager import BlockManager
from services.runtime.errors import ModelLoadError
from services.runtime.kv_cache import KVCache
from services.runtime.loader import LoadedModel
from services.runtime.model.llama import LayerPlan, LayerShard
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.request import Request
from services.spec.drafters.model_draft import ModelDraftConfig, ModelDrafter, _Growing, parallel_groups


@dataclass
class _DraftSeq:
    table: list[int]
    computed: int = 0  # draft KV is exact for positions < computed


class DraftModelDrafter(ModelDrafter):
    name = "draft-model"
    drafts_ahead = True  # its state is the draft KV of req.token_ids, exact below `computed`

    def __init__(self, draft: LoadedModel, target_vocab_size: int, config: ModelDraftConfig = ModelDraftConfig(),
                 num_kv_blocks: int = 1024, block_size: int = 16, shard: LayerShard | None = None) -> None:
        """`shard`: on a multi-rank draft worker, this rank's share of the parallel groups."""
        super().__init__(config)
        if draft.config.vocab_size != target_vocab_size:
            raise ModelLoadError(
                f"draft model {draft.name!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                f"{target_vocab_size}; a draft model must share the target's tokenizer"
            )
        dtype = next(draft.model.parameters()).dtype
        device = next(draft.model.parameters()).device
        self.draft = draft
        self.kv = KVCache.allocate(draft.config, num_kv_blocks, block_size, dtype, device)
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching=False)
        self._runner = ModelRunner(draft.model, self.kv)
        n = draft.config.num_hidden_layers
        self._plan = LayerPlan(parallel_groups=parallel_groups(n, config.parallel_group), shard=shard) if (
            config.parallel_group > 1) else None
        self.seqs: dict[str, _DraftSeq] = {}

    def _begin(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[tuple[_Growing, torch.Tensor] | None]:
        chosen: list[tuple[Request, int, _DraftSeq]] = []
        for req, budget in zip(reqs, budgets):
            if budget <= 0:
                continue
            seq = self.seqs.setdefault(req.request_id, _DraftSeq([]))
            if seq.computed > len(req.token_ids) - 1:  # the request was rewound: recompute from scratch
                self.blocks.free(seq.table)
                seq.computed = 0
            if self.blocks.allocate(seq.table, len(req.token_ids) + budget):
                chosen.append((req, budget, seq))
        if not chosen:
            return [None] * len(reqs)
        # Catch-up (= calibration): exact, layer-sequential, over everything not yet in the draft cache.
        out = self._runner.forward([SeqInput(r.token_ids[s.computed:], s.computed, s.table,
                                             logits=self._catch_up_logits(s.computed, r)) for r, _, s in chosen])
        self.passes += 1
        started = {}
        for (req, budget, seq), logits in zip(chosen, out.logits):
            self._caught_up(req, seq.computed, logits)
            seq.computed = len(req.token_ids)
            started[id(req)] = (_Growing(req, budget, seq.table, root_slot=len(req.token_ids) - 1), logits[-1])
        return [started.get(id(r)) for r in reqs]

    def _catch_up_logits(self, seq_computed: int, req: Request) -> str:
        """Which logits the catch-up pass returns: the root's, unless a subclass reads more."""
        return "last"

    def _caught_up(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """Hook: the catch-up pass's logits, rows from position `start` on."""

    def rewind(self, req: Request, num_tokens: int) -> None:
        seq = self.seqs.get(req.request_id)
        if seq is not None:
            seq.computed = min(seq.computed, num_tokens)

    def release(self, req: Request) -> None:
        seq = self.seqs.pop(req.request_id, None)
        if seq is not None:
            self.blocks.free(seq.table)

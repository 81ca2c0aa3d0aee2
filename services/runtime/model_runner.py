"""Build the model's inputs for a batch of sequences and run one forward pass.

Every forward mode is the same call: each sequence appends some new tokens after the
`start` tokens it already has in the cache.
- prefill (chunked): new tokens are a chunk of the prompt, causal;
- decode: one new token;
- tree verify: the root plus draft nodes, with explicit positions (prefix length + depth)
  and a mask that lets a node see only its ancestors and itself. Node i's KV is written
  to slot `start + i`; the caller keeps the accepted path's rows afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kernels.paged_attention import AttentionGroup, PagedAttentionMetadata
from services.runtime.attention_groups import CALL_OVERHEAD_SCORES, plan_groups
from services.runtime.kv_cache import KVCache
from services.runtime.model.llama import LayerPlan, LlamaForCausalLM


@dataclass
class SeqInput:
    token_ids: Sequence[int]
    start: int  # slots [0, start) already hold this sequence's KV
    block_table: Sequence[int]  # must cover slots up to start + len(token_ids)
    positions: Sequence[int] | None = None  # RoPE positions; default start, start + 1, ...
    tree_mask: torch.Tensor | None = None
    """[n, start - tree_start + n] bool: new token i may see slot tree_start + j. Default causal."""
    tree_start: int | None = None
    """Where the tree region begins (default `start`): slots before it are a prefix every new
    token sees; slots from it on are seen only where tree_mask says (a tree grown over passes)."""
    logits: Literal["last", "all", "none"] = "last"


@dataclass
class ForwardOutput:
    logits: list[torch.Tensor | None]  # per sequence: [1, V] ("last"), [n, V] ("all") or None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # captured layer -> [T, hidden]
    token_offsets: list[int] = field(default_factory=list)  # row of each sequence's first new token in T


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache,
                 attention_call_overhead: int = CALL_OVERHEAD_SCORES) -> None:
        self.model = model
        self.attention_call_overhead = attention_call_overhead  # see attention_groups.py
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_positions = model.config.max_position_embeddings
        self.last_calls = 0

    @torch.inference_mode()
    def forward(self, seqs: Sequence[SeqInput], capture: frozenset[int] = frozenset(),
                plan: LayerPlan | None = None) -> ForwardOutput:
        input_ids, positions, meta, offsets = self.prepare(seqs)
        hidden, captured = self.model(input_ids, positions, self.kv_cache.layers, meta, plan, capture)

        rows: list[torch.Tensor] = []
        counts: list[int] = []
        for s, off in zip(seqs, offsets):
            n = len(s.token_ids)
            r = {"last": [off + n - 1], "all": list(range(off, off + n)), "none": []}[s.logits]
            rows.append(torch.tensor(r, dtype=torch.long))
            counts.append(len(r))
        all_rows = torch.cat(rows).to(self.device)
        logits = self.model.compute_logits(hidden[all_rows]) if len(all_rows) else None
        per_seq: list[torch.Tensor | None] = []
        at = 0
        for c in counts:
            per_seq.append(logits[at:at + c] if c else None)
            at += c
        return ForwardOutput(per_seq, captured, offsets)

    def prepare(self, seqs: Sequence[SeqInput]) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata, list[int]]:
        """Inputs in attention-group order (see attention_groups.py); `offsets[i]` is where
        sequence i's new tokens start in T."""
        bs = self.block_size
        q_lens = [len(s.token_ids) for s in seqs]
        kv_lens = [s.start + n for s, n in zip(seqs, q_lens)]
        if min(q_lens) < 1:
            raise ValueError("every sequence in a forward pass needs at least one new token")

        ids: list[int] = []
        pos: list[int] = []
        offsets = [0] * len(seqs)
        slot_mapping: list[torch.Tensor] = []
        groups: list[AttentionGroup] = []
        for members in plan_groups(q_lens, kv_lens, self.attention_call_overhead):
            first_row = len(ids)
            lq = max(q_lens[i] for i in members)
            lk = max(kv_lens[i] for i in members)
            kv_slots = torch.zeros(len(members), lk, dtype=torch.long)
            for row, i in enumerate(members):
                s, kv_len = seqs[i], kv_lens[i]
                if len(s.block_table) * bs < kv_len:
                    raise ValueError(f"sequence {i}: block table covers {len(s.block_table) * bs} slots, "
                                     f"needs {kv_len}")
                offsets[i] = len(ids)
                ids.extend(s.token_ids)
                pos.extend(range(s.start, kv_len) if s.positions is None else s.positions)
                table = torch.tensor(s.block_table, dtype=torch.long)
                slots = (table.unsqueeze(1) * bs + torch.arange(bs)).flatten()[:kv_len]
                kv_slots[row, :kv_len] = slots
                slot_mapping.append(slots[s.start:])
            query_rows = None
            if any(q_lens[i] != lq for i in members):
                query_rows = torch.cat([torch.arange(q_lens[i]) + row * lq for row, i in enumerate(members)])
            groups.append(AttentionGroup(
                rows=slice(first_row, len(ids)),
                kv_slots=kv_slots.to(self.device),
                mask=self._mask(seqs, members, lq, lk),
                query_rows=None if query_rows is None else query_rows.to(self.device),
                batch_size=len(members),
                max_q_len=lq,
            ))
        if max(pos) >= self.max_positions:
            raise ValueError(f"position {max(pos)} is beyond the model's {self.max_positions} positions")

        self.last_calls = len(groups)  # attention calls per layer of the pass (the step-cost model's)
        meta = PagedAttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device), groups=groups)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        return input_ids, positions, meta, offsets

    def _mask(self, all_seqs: Sequence[SeqInput], members: list[int], lq: int, lk: int) -> torch.Tensor | None:
        """[B, 1, Lq, Lk] bool for a group: the cached prefix, then causal (or tree) among the new tokens."""
        seqs = [all_seqs[i] for i in members]
        q_lens = [len(s.token_ids) for s in seqs]
        if lq == 1 and all(s.tree_mask is None and s.start + 1 == lk for s in seqs):
            return None  # decode with equal lengths: every query sees every key
        start = torch.tensor([s.start for s in seqs]).view(-1, 1, 1)
        n = torch.tensor(q_lens).view(-1, 1, 1)
        qi = torch.arange(lq).view(1, -1, 1)
        kj = torch.arange(lk).view(1, 1, -1)
        mask = (kj < start) | ((kj >= start) & (kj - start <= qi))
        mask &= qi < n
        for i, s in enumerate(seqs):
            if s.tree_mask is not None:
                nn = q_lens[i]
                begin = s.start if s.tree_start is None else s.tree_start
                if s.tree_mask.shape != (nn, s.start + nn - begin):
                    raise ValueError(f"sequence {members[i]}: tree_mask has shape {tuple(s.tree_mask.shape)}, "
                                     f"expected {(nn, s.start + nn - begin)}")
                mask[i, :nn, begin:s.start + nn] = s.tree_mask.to(torch.bool).cpu()
        # Padding rows must see something, or softmax over nothing yields NaN; their output is dropped.
        mask[:, :, 0] |= qi.squeeze(2) >= n.squeeze(2)
        return additive_mask(mask.unsqueeze(1).to(self.device), self.dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 where allowed, -inf elsewhere. SDPA turns a boolean mask into exactly this
    in every call, so building it once per step gives bit-identical attention and spares each
    layer the conversion (6-16 us of a 90-280 us masked call on CPU: a tree, a prompt chunk)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

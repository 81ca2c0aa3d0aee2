"""Attention over a paged KV cache: the torch reference.

One call serves every forward mode. The batch is `B` sequences; sequence `b` appends
`q_len[b]` new tokens after `ctx_len[b]` tokens already in the cache. New tokens are
flattened to `T = sum(q_len)` rows for the projections; attention gathers each
sequence's keys from its blocks and runs a padded `scaled_dot_product_attention`.

Padding is the cost to watch: one padded batch computes `B * max(q_len) * max(ctx_len)`
scores, so a single 200-token prefill chunk beside fifteen decodes makes every decode pay
for 200 query rows (48 against 5.9 ms a layer for the two run apart, measured on CPU), and a
few draft trees make a decode batch pay for the deepest tree. So the batch is split into
`AttentionGroup`s of sequences with similar new-token counts (the model runner chooses
them), each one padded SDPA; their tokens are contiguous rows of T.

Who may attend to what is a mask over (new token, cache slot), built once per step (as
the additive 0 / -inf mask SDPA would otherwise derive from a boolean one in every layer)
and shared by all layers: causal for prefill and decode, ancestors-only for a
draft tree. A GPU kernel can later take the same metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended as one padded batch. Built by the model runner, on the model's device."""

    rows: slice  # their new tokens' rows in T
    kv_slots: torch.Tensor  # [B, Lk] int64: flat cache slots of each sequence's keys, padded with slot 0
    mask: torch.Tensor | None  # [B, 1, Lq, Lk] additive, in the queries' dtype: 0 = may attend, -inf = may
    #                             not (a boolean one works too); None = every query sees every key
    query_rows: torch.Tensor | None  # [rows] int64: row of each new token in the padded [B * Lq] layout;
    #                                   None when every sequence has exactly Lq new tokens (no padding)
    batch_size: int
    max_q_len: int


@dataclass
class PagedAttentionMetadata:
    """Per-step indices shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each new token
    groups: list[AttentionGroup]


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    group: AttentionGroup,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [B, Lk, kv_heads, head_dim]
    kv_heads, head_dim = k_cache.shape[-2:]
    slots = group.kv_slots.view(-1)  # index_select is several times faster than advanced indexing here
    k = k_cache.view(-1, kv_heads, head_dim).index_select(0, slots).view(group.batch_size, -1, kv_heads, head_dim)
    v = v_cache.view(-1, kv_heads, head_dim).index_select(0, slots).view(group.batch_size, -1, kv_heads, head_dim)
    return k, v


def attend(
    q: torch.Tensor,  # [rows, heads, head_dim]: the group's new tokens
    k: torch.Tensor,  # [B, Lk, kv_heads, head_dim], gathered
    v: torch.Tensor,
    group: AttentionGroup,
    scale: float,
) -> torch.Tensor:  # [rows, heads, head_dim]
    """One masked SDPA over the group's padded batch."""
    _, heads, head_dim = q.shape
    b, lq = group.batch_size, group.max_q_len
    if group.query_rows is None:
        qp = q.view(b, lq, heads, head_dim)
    else:
        qp = q.new_zeros(b * lq, heads, head_dim)
        qp[group.query_rows] = q
        qp = qp.view(b, lq, heads, head_dim)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),  # [B, H, Lq, D]
        k.transpose(1, 2),  # [B, KVH, Lk, D]
        v.transpose(1, 2),
        attn_mask=group.mask,
        scale=scale,
        enable_gqa=heads != k.shape[2],
    )  # [B, H, Lq, D]
    out = out.transpose(1, 2).reshape(b * lq, heads, head_dim)
    return out if group.query_rows is None else out[group.query_rows]


def attend_by_group(
    q: torch.Tensor,  # [T, heads, head_dim]
    kv_of: Callable[[AttentionGroup], tuple[torch.Tensor, torch.Tensor]],  # a group's gathered keys and values
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads, head_dim]
    outs = [attend(q[g.rows], *kv_of(g), g, scale) for g in meta.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads, head_dim]
    """Reference: per group, gather keys and values by slot, then one masked SDPA."""
    return attend_by_group(q, lambda g: gather_kv(k_cache, v_cache, g), meta, scale)

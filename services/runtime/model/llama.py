"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) on a paged KV cache.

Written here so the runtime owns the KV layout, the attention mask (draft trees), the
layer order (self-drafting, EasySpec) and the hidden states. q/k/v and gate/up are
fused into one matmul each; everything works on the flattened tokens of the batch,
`T = sum of new tokens per sequence`, and attention goes through `kernels/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels import linear as linear_kernels
from kernels.paged_attention import (
    AttentionGroup,
    PagedAttentionMetadata,
    attend_by_group,
    gather_kv,
    paged_attention,
    write_kv,
)
from services.runtime.errors import ModelLoadError
from services.runtime.model_config import ModelConfig, rope_inv_freq

KVCache = tuple[torch.Tensor, torch.Tensor]  # per layer: ([blocks, block_size, kv_heads, D],) * 2


@dataclass(frozen=True)
class LayerShard:
    """This process's share of each EasySpec parallel group when a draft runs on several ranks:
    of a group's attention sublayers, rank r computes every `world`-th from the r-th, and
    `all_reduce` sums the group's outputs (zeros where another rank computed) across ranks.
    A rank writes draft KV only for the layers it computes, and only it reads them; the exact
    sequential catch-up pass that every rank runs rewrites all layers for committed tokens."""

    rank: int
    world: int
    all_reduce: Callable[[torch.Tensor], None] = field(compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank}")

    def mine(self, layers: list[int]) -> list[int]:
        return layers[self.rank::self.world]


@dataclass(frozen=True)
class LayerPlan:
    """How a forward pass walks the layers: all of them in order (the target), or a draft.

    - skip_attention / skip_mlp: sublayers that act as the identity (SWIFT self-drafting); a
      skipped attention writes no KV for that layer.
    - parallel_groups: groups of consecutive layers whose attention sublayers read the group's
      input (EasySpec layer-parallel drafting); with `shard`, split across ranks.
    """

    skip_attention: frozenset[int] = frozenset()
    skip_mlp: frozenset[int] = frozenset()
    parallel_groups: tuple[tuple[int, ...], ...] = ()
    shard: LayerShard | None = None

    def schedule(self, num_layers: int) -> list[tuple[int, ...]]:
        starts = {g[0]: g for g in self.parallel_groups}
        out, i = [], 0
        while i < num_layers:
            group = starts.get(i, (i,))
            out.append(group)
            i += len(group)
        return out


class Linear(nn.Linear):
    """nn.Linear that can switch to a prepacked CPU kernel (kernels/linear.py) once weights are
    loaded, for the row counts where it was timed faster than the reference."""

    packed: torch.Tensor | None = None
    prefer_packed: tuple[bool, ...] | None = None  # per kernels.linear.ROW_BUCKETS; None: always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_kernels.linear(x, self.weight, self.bias, self.packed, self.prefer_packed)

    def pack(self, release_weight: bool, timings: dict | None = None) -> None:
        """Prepack; with `timings` (shared across layers: shape -> choice), time both kernels
        per row bucket once per weight shape and keep whichever copies the choice needs."""
        self.packed = linear_kernels.pack(self.weight)
        if self.packed is None:
            return
        if timings is not None:
            key = (tuple(self.weight.shape), self.weight.dtype, self.bias is not None)
            if key not in timings:
                timings[key] = linear_kernels.time_packed_vs_reference(self.weight, self.packed, self.bias)
            self.prefer_packed = timings[key]
            if not any(self.prefer_packed):
                self.packed, self.prefer_packed = None, None  # the reference wins everywhere
                return
            if not all(self.prefer_packed):
                return  # both kernels serve some row counts: keep both copies
        if release_weight:
            # From here on the packed copy is the weight; keep one copy in memory, not two.
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, in the rotate-half layout Hugging Face checkpoints use."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in float32 on the buffers' device; also after meta-device init."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = torch.tensor(rope_inv_freq(self.config), dtype=torch.float64, device=device)
        t = torch.arange(self.config.max_position_embeddings, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().float()
        self.sin = emb.sin().float()

    def forward(self, positions: torch.Tensor) -> Rope:
        """The [T, 1, D] cos and sin of this step's positions, looked up once for all layers."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


Rope = tuple[torch.Tensor, torch.Tensor]


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:  # x: [T, heads, D]
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: Rope,
        kv_cache: KVCache,
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        q = self.project(self.qkv_proj(x), rope, kv_cache, meta)
        out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(x.shape[0], self.q_size))

    def project(self, qkv: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: PagedAttentionMetadata) -> torch.Tensor:
        """qkv [T, q + 2 kv] -> rotated q [T, H, D]; rotated k and v go into the cache."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), rope)
        k = apply_rope(k.reshape(t, self.num_kv_heads, self.head_dim), rope)
        write_kv(kv_cache[0], kv_cache[1], k, v.reshape(t, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        return q


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: PagedAttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],
        meta: PagedAttentionMetadata,
        plan: LayerPlan | None = None,
        capture: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns the final-normed hidden states [T, hidden] and, for each layer index in
        `capture`, that layer's output. `plan` changes the layer order for drafting."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions)
        captured: dict[int, torch.Tensor] = {}
        plan = plan or LayerPlan()
        for group in plan.schedule(len(self.layers)):
            if len(group) == 1:
                i = group[0]
                layer = self.layers[i]
                if i not in plan.skip_attention:
                    x = x + layer.self_attn(layer.input_layernorm(x), rope, kv_caches[i], meta)
                if i not in plan.skip_mlp:
                    x = x + layer.mlp(layer.post_attention_layernorm(x))
            else:
                x = self._parallel_group(group, x, rope, kv_caches, meta, plan)
            for i in group:
                if i in capture:
                    captured[i] = x
        return self.norm(x), captured

    def _parallel_group(self, group: tuple[int, ...], x: torch.Tensor, rope: Rope, kv_caches: list[KVCache],
                        meta: PagedAttentionMetadata, plan: LayerPlan) -> torch.Tensor:
        """EasySpec: the group's attention sublayers all read the group input `x`, as one batched
        projection and one batched attention; then the group folds in order, each layer adding
        its attention output to the residual and running its MLP on the result."""
        attn = [i for i in group if i not in plan.skip_attention]
        mine = plan.shard.mine(attn) if plan.shard is not None else attn
        outputs: dict[int, torch.Tensor] = {}
        if mine:
            t = x.shape[0]
            normed = [self.layers[i].input_layernorm(x) for i in mine]
            qkv = self._group_qkv(tuple(mine), normed)  # [len(mine)] of [T, q + 2 kv]
            qs = [self.layers[i].self_attn.project(part, rope, kv_caches[i], meta) for i, part in zip(mine, qkv)]

            def group_kv(group: AttentionGroup) -> tuple[torch.Tensor, torch.Tensor]:
                kvs = [gather_kv(kv_caches[i][0], kv_caches[i][1], group) for i in mine]
                return torch.cat([k for k, _ in kvs], dim=2), torch.cat([v for _, v in kvs], dim=2)

            # The layers' heads side by side: head h of layer j still maps to that layer's kv heads.
            first = self.layers[mine[0]].self_attn
            out = attend_by_group(torch.cat(qs, dim=1), group_kv, meta, first.scale)
            for i, o in zip(mine, out.chunk(len(mine), dim=1)):
                outputs[i] = self.layers[i].self_attn.o_proj(o.reshape(t, first.q_size))
        if plan.shard is not None and attn:
            summed = x.new_zeros(len(attn), *x.shape)
            for j, i in enumerate(attn):
                if i in outputs:
                    summed[j] = outputs[i]
            plan.shard.all_reduce(summed)  # every rank now holds every layer's output
            outputs = dict(zip(attn, summed))
        for i in group:
            if i in outputs:
                x = x + outputs[i]
            if i not in plan.skip_mlp:
                x = x + self.layers[i].mlp(self.layers[i].post_attention_layernorm(x))
        return x

    def _group_qkv(self, layers: tuple[int, ...], normed: list[torch.Tensor]) -> list[torch.Tensor]:
        """q/k/v projections of several layers as one batched matmul (each layer normalised the
        shared input with its own weights). Where the weights were prepacked for the CPU kernel,
        which is faster than a batched fp32 matmul there, each layer runs its packed projection."""
        weights = torch.stack([self.layers[i].self_attn.qkv_proj.weight for i in layers])  # [G, out, in]
        if weights.numel() == 0:  # weights were released after packing: project layer by layer
            return [self.layers[i].self_attn.qkv_proj(h) for i, h in zip(layers, normed)]
        out = torch.bmm(torch.stack(normed), weights.transpose(1, 2))  # [G, T, out]
        biases = [self.layers[i].self_attn.qkv_proj.bias for i in layers]
        return [o + b if b is not None else o for o, b in zip(out, biases)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.lm_head(hidden).float()

    def pack_linear_weights(self, autotune: bool = True) -> None:
        """Switch projections to the prepacked CPU kernel where it is faster. Call after loading
        weights. `autotune`: time both kernels per weight shape and row count on this machine
        (about a second); otherwise pack everything."""
        timings: dict | None = {} if autotune else None
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                tied = name == "lm_head" and self.config.tie_word_embeddings  # the embedding still reads it
                module.pack(release_weight=not tied, timings=timings)

    @torch.no_grad()
    def load_hf_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy weights named as in a Hugging Face checkpoint, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor, rows: slice | None = None) -> None:
            p = params[name]
            dst = p if rows is None else p[rows]
            if dst.shape != tensor.shape:
                raise ModelLoadError(f"weight {name}{'' if rows is None else rows}: checkpoint has shape "
                                     f"{tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name if rows is None else f"{name}[{rows.start}]")

        q, kv = self.layers[0].self_attn.q_size, self.layers[0].self_attn.kv_size
        inter = self.config.intermediate_size
        fused = {
            "q_proj": ("self_attn.qkv_proj", slice(0, q)),
            "k_proj": ("self_attn.qkv_proj", slice(q, q + kv)),
            "v_proj": ("self_attn.qkv_proj", slice(q + kv, q + 2 * kv)),
            "gate_proj": ("mlp.gate_up_proj", slice(0, inter)),
            "up_proj": ("mlp.gate_up_proj", slice(inter, 2 * inter)),
        }
        for name, tensor in weights.items():
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if parts[0] == "layers" and parts[3] in fused:
                target, rows = fused[parts[3]]
                put(f"layers.{parts[1]}.{target}.{parts[4]}", tensor, rows)
            elif name in params:
                put(name, tensor)
            else:
                raise ModelLoadError(f"checkpoint has an unexpected weight {name!r} for {self.config.architecture}")
        expected = self._expected_keys(q, kv, inter)
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def _expected_keys(self, q: int, kv: int, inter: int) -> set[str]:
        keys: set[str] = set()
        for name, _ in self.named_parameters():
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                keys |= {f"{name}[0]", f"{name}[{q}]", f"{name}[{q + kv}]"}
            elif name.endswith("gate_up_proj.weight"):
                keys |= {f"{name}[0]", f"{name}[{inter}]"}
            else:
                keys.add(name)
        return keys

"""The KV cache tensors: per layer, K and V of shape [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.runtime.model_config import ModelConfig


@dataclass
class KVCache:
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> KVCache:
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        return cls(layers, block_size)

    @property
    def num_blocks(self) -> int:
        return self.layers[0][0].shape[0]

    @staticmethod
    def blocks_for_budget(cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
        per_block = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
        return max(1, budget_bytes // per_block)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V rows from flat slots `src` to flat slots `dst` in every layer (tree compaction).
        The right-hand side is gathered before the write, so overlapping moves are safe."""
        for k, v in self.layers:
            for t in (k, v):
                flat = t.view(-1, *t.shape[2:])
                flat[dst] = flat[src]

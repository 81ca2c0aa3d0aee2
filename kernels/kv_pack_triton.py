"""Triton kernels behind kernels/kv_pack.py for a KV cache on CUDA.

One launch per layer moves both K and V: program (i, c) copies elements
[c * BLOCK, (c + 1) * BLOCK) of the i-th requested block. A block is
block_size * kv_heads * head_dim contiguous elements, so each program reads and writes
one contiguous run, whatever the block ids. Tested against the torch reference in
tests/unit/test_kv_pack.py (marked gpu). kv_pack.py imports this module only for CUDA
tensors, and Triton itself is optional.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kv_pack.py keeps the torch reference
    triton = None

_BLOCK = 1024  # elements per program: one to a few dozen programs per KV block


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _pack_layer(k_ptr, v_ptr, ids_ptr, out_ptr, v_offset, block_elems, BLOCK: tl.constexpr):
        # k, v: [num_blocks, block_elems]; out: [2, n_blocks, block_elems] (K rows, then V rows);
        # v_offset = n_blocks * block_elems, computed on the host (Triton widens it to int64 if needed)
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < block_elems
        src = tl.load(ids_ptr + i).to(tl.int64) * block_elems + offs  # int64: caches exceed 2**31 elements
        dst = i.to(tl.int64) * block_elems + offs
        tl.store(out_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
        tl.store(out_ptr + v_offset + dst, tl.load(v_ptr + src, mask=mask), mask=mask)

    @triton.jit
    def _unpack_layer(buf_ptr, ids_ptr, k_ptr, v_ptr, v_offset, block_elems, BLOCK: tl.constexpr):
        # buf: [2, n_blocks, block_elems]; k, v: [num_blocks, block_elems]; v_offset as in _pack_layer
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < block_elems
        src = i.to(tl.int64) * block_elems + offs
        dst = tl.load(ids_ptr + i).to(tl.int64) * block_elems + offs
        tl.store(k_ptr + dst, tl.load(buf_ptr + src, mask=mask), mask=mask)
        tl.store(v_ptr + dst, tl.load(buf_ptr + v_offset + src, mask=mask), mask=mask)


def pack_blocks_triton(layers, block_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` [L, 2, n, *block] from contiguous CUDA caches; `block_ids` int64 on their device."""
    n = block_ids.numel()
    if n == 0:
        return out
    block_elems = layers[0][0][0].numel()
    grid = (n, triton.cdiv(block_elems, _BLOCK))
    for i, (k, v) in enumerate(layers):
        _pack_layer[grid](k, v, block_ids, out[i], n * block_elems, block_elems, BLOCK=_BLOCK)
    return out


def unpack_blocks_triton(buffer: torch.Tensor, layers, block_ids: torch.Tensor) -> None:
    """Write `buffer` [L, 2, n, *block] into blocks `block_ids` of contiguous CUDA caches."""
    n = block_ids.numel()
    if n == 0:
        return
    if not buffer.is_contiguous():
        buffer = buffer.contiguous()
    block_elems = layers[0][0][0].numel()
    grid = (n, triton.cdiv(block_elems, _BLOCK))
    for i, (k, v) in enumerate(layers):
        _unpack_layer[grid](buffer[i], block_ids, k, v, n * block_elems, block_elems, BLOCK=_BLOCK)

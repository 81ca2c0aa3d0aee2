"""Packing a request's KV blocks into one buffer and back (kernels/kv_pack.py)."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_pack import (
    pack_blocks,
    pack_blocks_reference,
    packed_shape,
    unpack_blocks,
    unpack_blocks_reference,
)


def random_cache(num_layers=3, num_blocks=10, block_size=4, kv_heads=2, head_dim=8, dtype=torch.float32,
                 device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [(torch.randn(shape, generator=g, device=device).to(dtype),
             torch.randn(shape, generator=g, device=device).to(dtype)) for _ in range(num_layers)]


def empty_like_cache(layers):
    return [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]


def test_pack_layout_is_k_then_v_per_layer():
    layers = random_cache()
    ids = torch.tensor([7, 2, 5])  # not contiguous, not sorted
    buf = pack_blocks(layers, ids)
    assert buf.shape == (3, 2, 3, 4, 2, 8) == packed_shape(layers, 3)
    assert buf.is_contiguous()
    for i, (k, v) in enumerate(layers):
        assert torch.equal(buf[i, 0], k[ids])
        assert torch.equal(buf[i, 1], v[ids])


@pytest.mark.parametrize("block", [(4, 2, 8), (3, 1, 5)])  # 256-byte rows, and 60-byte rows (no 16-byte view)
def test_round_trip_into_other_blocks_leaves_the_rest_untouched(block):
    size, heads, dim = block
    src = random_cache(seed=1, block_size=size, kv_heads=heads, head_dim=dim)
    dst = random_cache(seed=2, block_size=size, kv_heads=heads, head_dim=dim)
    before = [(k.clone(), v.clone()) for k, v in dst]
    src_ids, dst_ids = torch.tensor([0, 9, 3, 4]), torch.tensor([8, 1, 6, 2])
    unpack_blocks(pack_blocks(src, src_ids), dst, dst_ids)
    untouched = [b for b in range(10) if b not in dst_ids.tolist()]
    for (sk, sv), (dk, dv), (bk, bv) in zip(src, dst, before):
        assert torch.equal(dk[dst_ids], sk[src_ids]) and torch.equal(dv[dst_ids], sv[src_ids])
        assert torch.equal(dk[untouched], bk[untouched]) and torch.equal(dv[untouched], bv[untouched])


def test_out_buffer_is_filled_in_place_and_layer_slices_stream():
    layers = random_cache(num_layers=4)
    ids = [1, 3]
    whole = pack_blocks(layers, ids)
    out = torch.full(packed_shape(layers, 2), float("nan"))
    for start in (0, 2):  # layer by layer, into slices of one buffer
        assert pack_blocks(layers[start:start + 2], ids, out=out[start:start + 2]).data_ptr() == out[start].data_ptr()
    assert torch.equal(out, whole)


def test_bfloat16_and_empty_block_list():
    layers = random_cache(dtype=torch.bfloat16)
    dst = empty_like_cache(layers)
    unpack_blocks(pack_blocks(layers, [4, 0]), dst, [4, 0])
    assert torch.equal(dst[2][1][[4, 0]], layers[2][1][[4, 0]])
    assert pack_blocks(layers, torch.tensor([], dtype=torch.int64)).shape == (3, 2, 0, 4, 2, 8)


def test_bad_buffers_are_rejected_with_the_expected_shape():
    layers = random_cache()
    with pytest.raises(ValueError, match=r"expected \(3, 2, 2, 4, 2, 8\)"):
        pack_blocks(layers, [0, 1], out=torch.empty(3, 2, 3, 4, 2, 8))
    with pytest.raises(ValueError, match="dtype|float64"):
        unpack_blocks(torch.empty(3, 2, 2, 4, 2, 8, dtype=torch.float64), layers, [0, 1])
    with pytest.raises(ValueError, match="contiguous"):
        pack_blocks(layers, [0], out=torch.empty(2, 3, 1, 4, 2, 8).transpose(0, 1))
    with pytest.raises(ValueError, match="1-D"):
        pack_blocks(layers, torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.gpu
def test_triton_matches_reference():
    from kernels import kv_pack_triton

    if not kv_pack_triton.available():
        pytest.skip("triton is not installed")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # 16 x 3 x 64 = 3072 elements per block fill three 1024-element tiles; 1920 leaves a masked tail.
        for block_shape in ((16, 3, 64), (16, 5, 24)):
            layers = random_cache(num_layers=5, num_blocks=40, block_size=block_shape[0], kv_heads=block_shape[1],
                                  head_dim=block_shape[2], dtype=dtype, device="cuda")
            ids = torch.tensor([39, 0, 17, 5, 22, 23, 1], device="cuda")
            got = kv_pack_triton.pack_blocks_triton(layers, ids, torch.empty(packed_shape(layers, 7), dtype=dtype,
                                                                                device="cuda"))
            assert torch.equal(got, pack_blocks_reference(layers, ids))
            assert torch.equal(pack_blocks(layers, ids), got)  # the dispatcher picks Triton on CUDA

            dst_ref, dst_tri = empty_like_cache(layers), empty_like_cache(layers)
            dst_ids = torch.tensor([3, 30, 8, 9, 0, 38, 12], device="cuda")
            unpack_blocks_reference(got, dst_ref, dst_ids)
            kv_pack_triton.unpack_blocks_triton(got, dst_tri, dst_ids)
            for (rk, rv), (tk, tv) in zip(dst_ref, dst_tri):
                assert torch.equal(rk, tk) and torch.equal(rv, tv)

"""The chunked top-k that Token Recycling learns from: the same tokens as `torch.topk`."""

from __future__ import annotations

import pytest
import torch

from services.spec.drafter import TOPK_CHUNK, top_candidates, topk_indices


@pytest.mark.parametrize("vocab", [49152, 49152 + 77, 32 * TOPK_CHUNK])
@pytest.mark.parametrize("k", [1, 8])
def test_chunked_topk_finds_what_topk_finds(vocab, k):
    torch.manual_seed(vocab + k)
    logits = torch.randn(17, vocab)
    # Rows whose best tokens crowd into one chunk, or sit in the padded last chunk.
    logits[1, 100:100 + k] += 50.0
    logits[2, -k:] += 50.0
    logits[3, :TOPK_CHUNK] += 50.0
    got = topk_indices(logits, k)
    want = logits.topk(k, dim=-1)
    assert got.shape == (17, k)
    torch.testing.assert_close(logits.gather(1, got), want.values, rtol=0, atol=0)
    assert torch.equal(got, want.indices)  # random values: no ties, so the same order too


def test_small_vocabularies_fall_back_to_topk():
    logits = torch.randn(3, 64)
    assert torch.equal(topk_indices(logits, 8), logits.topk(8, dim=-1).indices)


def test_top_candidates_are_int32_token_ids_best_first():
    logits = torch.full((2, 49152), -1.0)
    logits[0, [7, 40000, 123]] = torch.tensor([3.0, 2.0, 1.0])
    logits[1, [49151, 5]] = torch.tensor([9.0, 8.0])
    top = top_candidates(logits, 3)
    assert top.dtype == torch.int32
    assert top[0].tolist() == [7, 40000, 123]
    assert top[1, :2].tolist() == [49151, 5]

"""The CPU linear kernel choice: per weight shape and row count, the packed oneDNN kernel or
`F.linear`, whichever was timed faster; both compute the same product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import linear as linear_kernels
from services.runtime.model.llama import Linear

pytestmark = pytest.mark.skipif(linear_kernels.pack(torch.zeros(4, 4)) is None,
                                reason="needs the oneDNN linear ops")


def _layer() -> Linear:
    torch.manual_seed(0)
    return Linear(64, 32, bias=True)


def test_row_buckets_round_up_and_cap():
    buckets = linear_kernels.ROW_BUCKETS
    assert [linear_kernels.row_bucket(n) for n in (1, 2, 3, 8, 9, 10_000)] == [
        0, 1, 2, buckets.index(8), buckets.index(16), len(buckets) - 1]


@pytest.mark.parametrize("choice", ["mixed", "all packed", "none packed"])
def test_the_timed_choice_picks_the_kernel_and_keeps_the_copies_it_needs(choice):
    n = len(linear_kernels.ROW_BUCKETS)
    prefer = {"mixed": (False,) + (True,) * (n - 1), "all packed": (True,) * n, "none packed": (False,) * n}[choice]
    layer = _layer()
    weight = layer.weight.detach().clone()
    key = (tuple(weight.shape), weight.dtype, True)
    layer.pack(release_weight=True, timings={key: prefer})
    assert (layer.packed is not None) == any(prefer)
    assert (layer.weight.numel() == 0) == all(prefer)  # the plain copy is dropped only if never used
    for rows in (1, 5, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_timing_returns_a_choice_per_bucket_and_is_shared_by_equal_shapes():
    timings: dict = {}
    a, b = _layer(), _layer()
    a.pack(release_weight=False, timings=timings)
    b.pack(release_weight=False, timings=timings)
    (choice,) = timings.values()
    assert len(choice) == len(linear_kernels.ROW_BUCKETS) and all(isinstance(c, bool) for c in choice)
    assert a.prefer_packed == b.prefer_packed == (choice if any(choice) else None)


def test_timing_streams_each_call_from_another_copy_of_the_weight(monkeypatch):
    """Cold-cache timing: a model reads each layer's weight once per pass, from memory; timing
    one copy over and over (from cache) once chose the slower kernel for decoding."""
    layer = _layer()
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    seen: set[int] = set()
    reference = F.linear

    def spy(x, weight, bias=None):
        seen.add(weight.data_ptr())
        return reference(x, weight, bias)

    monkeypatch.setattr(linear_kernels.F, "linear", spy)
    packed = linear_kernels.pack(layer.weight)
    linear_kernels.time_packed_vs_reference(layer.weight, packed, layer.bias, cold_bytes=10 * weight_bytes)
    assert len(seen) == 10

"""Linear layers on CPU through oneDNN with prepacked weights.

On x86 CPUs, `F.linear` with few rows (decode: 1 to a few dozen tokens) runs far below
memory bandwidth; the same product through oneDNN with the weight reordered once into
its blocked layout is 2-4x faster at 1-64 rows and no slower at 512 (measured on the
2-core AVX-512 machines this project runs on). The reference is `F.linear`; `pack`
returns None where the oneDNN ops are missing, and callers keep the reference path.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The packed layout is tuned for a batch size; 16 rows served 1..512 rows well (see module doc).
_PACK_BATCH_HINT = 16


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """[out, in] weight -> an opaque oneDNN tensor for `packed_linear`, or None if unsupported."""
    if not can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)
    except RuntimeError:
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None = None, prefer_packed: tuple[bool, ...] | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out]: the packed path when given (and, with `prefer_packed` per row
    bucket, where it was timed faster), else the reference."""
    if packed is not None and (prefer_packed is None or prefer_packed[row_bucket(x.numel() // x.shape[-1])]):
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


# Which kernel is faster depends on the machine and the shape: on some 2-core AVX-512 VMs the
# packed path is 2-4x faster at every row count; on others, timed with a warm cache, `F.linear`
# won at one row (decode) while the packed path won at 8-64 rows (tree verification). So it is
# timed, not assumed, and timed cold (see COLD_BYTES).
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def row_bucket(rows: int) -> int:
    """Index of the smallest bucket >= rows (the last bucket for anything larger)."""
    return min(bisect.bisect_left(ROW_BUCKETS, rows), len(ROW_BUCKETS) - 1)


# Timed with the weights out of cache, as the model meets them: each layer's weight is streamed
# from memory once per forward pass. Timed warm (one copy called over and over, from L2/L3),
# `F.linear` won at one row for the 576x576 and 960x576 projections of SmolLM2-135M on a
# machine where, cold, it took 2.4x the packed kernel: plain decoding lost 2 ms of 22 a step.
COLD_BYTES = 64 << 20  # twice this machine family's 32 MiB L3


def time_packed_vs_reference(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                             repeats: int = 3, min_seconds: float = 2e-3,
                             cold_bytes: int = COLD_BYTES) -> tuple[bool, ...]:
    """Per row bucket: True where the packed kernel beats `F.linear` on this machine. Each side
    gets the fastest of `repeats` timings (noise on a shared machine only ever adds time), each
    timing as many calls as fill `min_seconds`; a call that alone takes ten times that is timed
    once after its warm-up. SmolLM2's 49152-row lm_head takes 20-140 ms a call at 1-128 rows:
    timed ten times per side and bucket, it made up 5 s of a 9 s model load. Successive calls
    read successive copies of the weight, `cold_bytes` of them in all, so none is in cache."""
    copies = max(1, min(64, cold_bytes // max(1, weight.numel() * weight.element_size())))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    packs = [packed] + [pack(w) for w in weights[1:]]
    turn = itertools.cycle(range(copies))

    def fastest(fn: Callable[[], torch.Tensor]) -> float:
        start = time.perf_counter()
        fn()  # warm-up: first calls allocate and pick kernels
        once = time.perf_counter() - start
        calls = max(1, min(8, int(min_seconds / max(once, 1e-6))))
        best = float("inf")
        for _ in range(1 if once > 10 * min_seconds else repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls)
        return best

    prefer = []
    with torch.no_grad():
        for rows in ROW_BUCKETS:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            reference = fastest(lambda x=x: F.linear(x, weights[next(turn)], bias))
            prefer.append(fastest(lambda x=x: packed_linear(x, packs[next(turn)], bias)) < reference)
    return tuple(prefer)

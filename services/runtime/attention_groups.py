"""Which sequences of a step share one padded attention call.

A padded call over sequences with new-token counts q and cached lengths k computes
`len * max(q) * max(k)` scores (kernels/paged_attention.py), so a prefill chunk or a deep
draft tree batched with decodes multiplies the decodes' attention. Each extra call costs a
fixed launch overhead instead. Sequences are sorted by new-token count and cut into
contiguous runs minimising padded scores plus that overhead, exactly, by dynamic
programming over the distinct counts (a handful per step: 1 for decodes, the tree sizes,
the chunk lengths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Fixed cost of one more attention call, in padded scores: estimated from SDPA timings on 2 CPU
# cores with SmolLM2-135M shapes (a call's fixed part is about what 4k decode scores cost).
CALL_OVERHEAD_SCORES = 4096


def plan_groups(q_lens: Sequence[int], kv_lens: Sequence[int],
                call_overhead: int = CALL_OVERHEAD_SCORES) -> list[list[int]]:
    """Partition sequence indices into attention groups, each sorted by index."""
    by_q: dict[int, list[int]] = {}
    for i, q in enumerate(q_lens):
        by_q.setdefault(q, []).append(i)
    qs = sorted(by_q)
    count = [len(by_q[q]) for q in qs]
    longest = [max(kv_lens[i] for i in by_q[q]) for q in qs]

    # best[j]: least cost of grouping the first j distinct counts; cut[j]: where its last group starts.
    best = [0.0] + [math.inf] * len(qs)
    cut = [0] * (len(qs) + 1)
    for j in range(1, len(qs) + 1):
        n, lk = 0, 0
        for i in range(j - 1, -1, -1):  # the last group holds distinct counts i..j-1
            n += count[i]
            lk = max(lk, longest[i])
            cost = best[i] + n * qs[j - 1] * lk + call_overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = len(qs)
    while j > 0:
        i = cut[j]
        groups.append(sorted(x for q in qs[i:j] for x in by_q[q]))
        j = i
    return groups[::-1]

"""Randomness keyed by (request seed, token position, stream), not by call order.

A seeded request therefore samples the same token at a position whatever else is in
the batch, whichever worker runs it, and after preemption or failover recomputes it.
SplitMix64 finalizer rounds over the key; pure Python, since it runs once per sampled row.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1

STREAM_SAMPLE = 0  # the uniform that picks the token (inverse CDF)
STREAM_ACCEPT = 1  # the uniform of a speculative accept / reject test
STREAM_DRAFT = 2  # a draft model's own draws (sampled proposals)


def _mix(x: int) -> int:
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def keyed_uniform(seed: int, position: int, stream: int = STREAM_SAMPLE, index: int = 0) -> float:
    """A uniform in (0, 1), a pure function of its arguments. `index` tells apart the several
    draws one position can need (one accept test per sibling of a draft tree)."""
    h = _mix((seed + 0x9E3779B97F4A7C15) & _MASK)
    h = _mix((h ^ (position * 0xD6E8FEB86659FD93)) & _MASK)
    h = _mix((h ^ (stream + 1) * 0xCA5A826395121157) & _MASK)
    if index:
        h = _mix((h ^ (index * 0x8CB92BA72F3D8DD7)) & _MASK)
    return ((h >> 11) + 0.5) / float(1 << 53)

"""How long a forward pass takes, as a function of the work in it.

SmartSpec (Liu et al. 2024) models batch execution time online from the batched tokens and the
context the batch attends over. Here a step's forward costs

    curve(tokens) + per_context * cached tokens read + per_pair * attention pairs
                  + per_row * logit rows

The curve is piecewise linear over token-count buckets: a straight line is a poor fit on CPUs,
where 1-8 tokens cost about the same and the cost then rises with the token count (compute
bound). The context terms are attention: every sequence reads its cache once (16 decoding
requests cost 30 ms at 100 tokens of context each and 48 ms at 500), and every new token is
scored against each slot it sees (a pair). Logit rows are the vocabulary projection, made for
every tree node but for one token of a prompt (128 prompt tokens cost 89 ms, as tree nodes
103). Counting tokens alone, cheap prefill steps pulled the curve down and tree steps of many
long requests ran 25-30% over their prediction under load.

A step whose sequences need more than one attention call (attention_groups.py: a draft tree or
a prompt chunk beside one-token decodes) pays for each extra call: every layer gathers the KV
and runs attention once more. Priced from token counts alone, 21 decoding requests with six
3-node trees ran 33% over their prediction (151 ms against 114; the extra calls' KV gathers
alone took 13 ms). `per_call` is learned from the steps that made extra calls, as what they
cost beyond the rest of the model; the curve learns only from steps that made one call, so
neither absorbs the other's error.

The three linear terms are measured once at start; the curve is seeded then too and follows
every step the engine runs (what the terms do not explain), by an exponential moving average
per bucket, so it tracks load on a shared machine. A step also costs time outside the
forward pass — scheduling, sampling, detokenising — which does not grow with the tree; it is
tracked separately, from steps that verified no tree, and added to every prediction, so
larger steps that amortise it are valued correctly. Each verified tree adds to it (acceptance,
the drafter learning from the tree's logits: 11 ms of a 21-request step with five trees against
5 ms without), learned as `per_tree` from the steps that verified trees.

Predictions use the monotone envelope of the buckets — a count never costs more than any
larger count was measured to — because the curve is only observed where the controller
steps: a bucket that one noisy sample made look dear would otherwise never be chosen, and so
never be measured again. An estimate that is too low is chosen, measured and corrected.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Token counts where the curve is sampled; between them it is interpolated.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


@dataclass(frozen=True)
class StepWork:
    """What a forward pass computes."""

    tokens: int = 0
    context: int = 0  # cached tokens read: each sequence's cache, once
    pairs: int = 0  # attention pairs: each new token times the slots it sees
    rows: int = 0  # logit rows
    calls: int = 0  # attention calls beyond the first
    trees: int = 0  # draft trees verified (each is accepted after the pass: step time, not forward)

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(self.tokens + other.tokens, self.context + other.context, self.pairs + other.pairs,
                        self.rows + other.rows, self.calls + other.calls, self.trees + other.trees)


def seq_work(new_tokens: int, cached: int, rows: int) -> StepWork:
    """One sequence's share of a forward: new_tokens after `cached` ones (each new token sees the
    cache and the new tokens up to itself), `rows` of them with logits."""
    if new_tokens == 0:
        return StepWork()
    return StepWork(new_tokens, cached, new_tokens * cached + new_tokens * (new_tokens + 1) // 2, rows)


def decode_work(other: StepWork | int, contexts: Sequence[int]) -> StepWork:
    """A plain decode step: `other` work (or tokens), plus one token for each decoding request
    over its cached tokens."""
    work = other if isinstance(other, StepWork) else StepWork(other)
    for cached in contexts:
        work += seq_work(1, cached, 1)
    return work


class StepCostModel:
    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}  # bucket -> EMA of forward seconds the terms leave
        self.overhead = 0.0  # EMA of the rest of a step's seconds, in steps that verified no tree
        self.per_tree = 0.0  # EMA of what each verified tree adds to it (acceptance, the drafter learning)
        self.per_context = 0.0  # seconds per cached token read
        self.per_pair = 0.0  # seconds per attention pair
        self.per_row = 0.0  # seconds per logit row
        self.per_call = 0.0  # seconds per attention call beyond the first (learned as steps run)

    def measured(self) -> StepCostModel:
        """A copy of what calibration measured (the terms and the curve), to seed another model."""
        copy = StepCostModel(self.smoothing)
        copy.adopt(self)
        return copy

    def adopt(self, measured: StepCostModel) -> None:
        self.seconds = dict(measured.seconds)
        self.per_context, self.per_pair, self.per_row = measured.per_context, measured.per_pair, measured.per_row

    def observe_overhead(self, seconds: float, trees: int = 0) -> None:
        """A step spent `seconds` outside its forward pass (and drafting), `trees` trees verified."""
        if trees:
            sample = max(0.0, (seconds - self.overhead) / trees)
            self.per_tree = (1 - self.smoothing) * self.per_tree + self.smoothing * sample
            return
        a = 1.0 if self.overhead == 0 else self.smoothing
        self.overhead = (1 - a) * self.overhead + a * seconds

    def measure_terms(self, time_forward: Callable[[int, int, int, bool], float], tokens: int = 64,
                      context: int = 256, seqs: int = 16, repeats: int = 3) -> None:
        """Measure the linear terms. `time_forward(seqs, n, cached, all_logits)` times a forward of
        `seqs` sequences of n new tokens after `cached` ones, logits at every token or the last.
        One long sequence over a cache is mostly pairs; many one-token ones mostly cache reads."""
        def fastest(*args) -> float:
            time_forward(*args)  # warm the kernels for this shape first
            return min(time_forward(*args) for _ in range(repeats))  # noise only ever adds time

        prompt = fastest(1, tokens, 0, False)
        self.per_row = max(0.0, fastest(1, tokens, 0, True) - prompt) / (tokens - 1)
        long_extra = max(0.0, fastest(1, tokens, context, False) - prompt)
        many_extra = max(0.0, fastest(seqs, 1, context, False) - fastest(seqs, 1, 0, False))
        # long_extra = tokens * context * p + context * c;  many_extra = seqs * context * (p + c)
        p_plus_c = many_extra / (seqs * context)
        self.per_pair = max(0.0, (long_extra / context - p_plus_c) / (tokens - 1))
        self.per_context = max(0.0, p_plus_c - self.per_pair)

    def calibrate(self, time_forward: Callable[[int], float], sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
                  repeats: int = 3) -> None:
        """Seed the curve with timed forward passes of the given token counts (a fresh prompt,
        logits at its last token; the fastest of a few)."""
        for n in sizes:
            time_forward(n)  # warm the kernels for this shape first
            seconds = min(time_forward(n) for _ in range(repeats))
            self.seconds[self._bucket(n)] = max(0.0, seconds - self._terms(seq_work(n, 0, 1)))

    def observe(self, work: StepWork | int, seconds: float) -> None:
        """A forward of this much work (or of this many tokens) took `seconds`."""
        work = work if isinstance(work, StepWork) else StepWork(work)
        if work.calls:
            extra = (seconds - self._terms(work) - self.predict_forward(work.tokens)) / work.calls + self.per_call
            self.per_call = (1 - self.smoothing) * self.per_call + self.smoothing * max(0.0, extra)
            return
        seconds = max(0.0, seconds - self._terms(work))
        b = self._bucket(work.tokens)
        old = self.seconds.get(b)
        self.seconds[b] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def predict(self, work: StepWork | int) -> float:
        """Seconds for a step of this much work (or this many tokens), the per-step overhead included."""
        work = work if isinstance(work, StepWork) else StepWork(work)
        return self.overhead + self.per_tree * work.trees + self._terms(work) + self.predict_forward(work.tokens)

    def _terms(self, work: StepWork) -> float:
        return (self.per_context * work.context + self.per_pair * work.pairs + self.per_row * work.rows
                + self.per_call * work.calls)

    def predict_forward(self, num_tokens: int) -> float:
        """Seconds of the token curve for num_tokens, interpolated between observed buckets."""
        if not self.seconds:
            return 1e-3 * max(1, num_tokens)  # uncalibrated: proportional, i.e. never speculate
        xs = sorted(self.seconds)
        ys = [self.seconds[x] for x in xs]
        for i in range(len(ys) - 2, -1, -1):  # the monotone envelope (see the module docstring)
            ys[i] = min(ys[i], ys[i + 1])
        if num_tokens <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, num_tokens)
        if i == len(xs):  # beyond the largest observation: extend the last slope (or proportionally)
            if len(xs) == 1:
                return ys[0] * num_tokens / xs[0]
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (num_tokens - xs[-1])
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)

    @staticmethod
    def _bucket(num_tokens: int) -> int:
        i = bisect.bisect_left(BUCKETS, num_tokens)
        if i == len(BUCKETS):
            return BUCKETS[-1]
        if i > 0 and num_tokens - BUCKETS[i - 1] < BUCKETS[i] - num_tokens:
            return BUCKETS[i - 1]
        return BUCKETS[i]

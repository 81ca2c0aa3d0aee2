"""How long a forward pass takes, as a function of the tokens in it.

SmartSpec (Liu et al. 2024) models batch execution time online as a function of batched
tokens. A straight line is a poor fit on CPUs, where 1-8 tokens cost about the same and
the cost then rises with the token count (compute-bound), so the model is piecewise
linear over token-count buckets. It is calibrated once at start (a few timed forward
passes) and then follows every step the engine runs, by an exponential moving average
per bucket, so it tracks load on a shared machine. A step also costs time outside the
forward pass — scheduling, sampling, acceptance, detokenising — which does not grow with the
tree; it is tracked separately and added to every prediction, so larger steps that amortise
it are valued correctly.

Predictions use the monotone envelope of the buckets — a count never costs more than any
larger count was measured to — because the curve is only observed where the controller
steps: a bucket that one noisy sample made look dear would otherwise never be chosen, and so
never be measured again. An estimate that is too low is chosen, measured and corrected.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

# Token counts where the curve is sampled; between them it is interpolated.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


class StepCostModel:
    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}  # bucket -> EMA of forward seconds
        self.overhead = 0.0  # EMA of the rest of a step's seconds

    def observe_overhead(self, seconds: float) -> None:
        a = 1.0 if self.overhead == 0 else self.smoothing
        self.overhead = (1 - a) * self.overhead + a * seconds

    def calibrate(self, time_forward: Callable[[int], float], sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
                  repeats: int = 3) -> None:
        """Seed the curve with timed forward passes of the given token counts (the fastest of
        a few: on a shared machine, noise only ever adds time)."""
        for n in sizes:
            time_forward(n)  # warm the kernels for this shape first
            self.seconds[self._bucket(n)] = min(time_forward(n) for _ in range(repeats))

    def observe(self, num_tokens: int, seconds: float) -> None:
        b = self._bucket(num_tokens)
        old = self.seconds.get(b)
        self.seconds[b] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def predict(self, num_tokens: int) -> float:
        """Seconds for a step whose forward covers num_tokens (the per-step overhead included)."""
        return self.overhead + self.predict_forward(num_tokens)

    def predict_forward(self, num_tokens: int) -> float:
        """Seconds for a forward over num_tokens, interpolated between observed buckets."""
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

"""Online estimate of what one model batch costs on one worker: ``seconds = fixed + per_token x padded tokens``.

Why this shape: a transformer batch's time is dominated by matrix products whose work grows with its padded
tokens (count x longest item), plus a per-batch overhead (the session call, input copies, thread hand-off).
Attention adds a term quadratic in the sequence length, but at the lengths served and in small batches the
linear term dominates, and a fit refreshed from the batches actually run absorbs the rest near their sizes.

The fit is exponentially weighted least squares: the newest batch weighs 1 and one ``age`` batches older
``(1 - 1/memory) ** age``, so the estimate follows a machine that slows down or speeds up (other load,
frequency scaling, a noisy neighbour) within about ``memory`` batches. A measurement counts at most
``MAX_RATIO`` times the prediction made before it, so one stall (a page fault storm, a descheduled thread)
moves the estimate by a few per cent, while a lasting slowdown still pulls it up by about 1/memory per batch.
The seed counts as ``prior_weight`` observations of an empty batch and of a ``token_scale``-token batch; they
fade like measurements but never below ``MIN_PRIOR_WEIGHT``: before any batch the estimate is the seed, and when
every batch has the same size (which leaves the split between the fixed and the per-token cost undetermined)
the split stays near the seed's while the prediction at the sizes run follows the measurements. Both
coefficients are kept non-negative.

Spread: the root mean square relative error of each prediction made before its batch ran, each error clipped at
100 % and weighted by the batch's predicted seconds as well as by age (the seed counts as one batch of
``token_scale`` tokens predicted 50 % off). Weighting by duration measures the error per second of work, which is
what a deadline pays for; unweighted, the scheduling jitter of tiny batches (a large share of their time, a
negligible share of a budget) would inflate every margin. `upper` adds ``MARGIN_DEVIATIONS`` spreads to
the prediction; decisions that must not be late (deadlines, budgets) use it, predictions of waiting use
`predict`.
"""
from __future__ import annotations

import math

MARGIN_DEVIATIONS = 2.0   # `upper` = predict x (1 + this x relative spread)
SEED_SPREAD = 0.5         # relative error assumed before any batch was measured
MAX_ERROR = 1.0           # one batch's relative error counts at most this much (a stall is not a trend)
MAX_RATIO = 2.0           # one batch's duration counts at most this many times its prediction
MIN_PRIOR_WEIGHT = 1e-3   # the seed's floor weight: only decides the fixed/per-token split of one-size data


class CostModel:
    """Per-model batch cost on one worker, fitted online from measured batch durations."""

    def __init__(self, fixed_s: float = 0.002, per_token_s: float = 0.0001, *, memory: float = 32.0,
                 prior_weight: float = 0.1, token_scale: float = 256.0):
        if fixed_s < 0 or per_token_s < 0:
            raise ValueError(f"cost model: seed costs must be >= 0 (got fixed_s={fixed_s}, per_token_s={per_token_s})")
        if memory < 1 or prior_weight <= 0 or token_scale <= 0:
            raise ValueError(f"cost model: need memory >= 1, prior_weight > 0, token_scale > 0 (got {memory}, "
                             f"{prior_weight}, {token_scale})")
        self.seed = (fixed_s, per_token_s)
        self.decay = 1.0 - 1.0 / memory
        self.prior_weight = prior_weight
        self.token_scale = token_scale
        # Weighted sums of the measurements (u = padded tokens / token_scale, y = seconds): w, w*u, w*u^2, w*y, w*u*y.
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]
        self._prior = prior_weight          # the seed's current weight (fades with the measurements)
        seed_seconds = max(fixed_s + per_token_s * token_scale, 1e-6)
        self._error_sq = SEED_SPREAD ** 2 * seed_seconds   # duration-weighted sum of squared relative errors
        self._error_weight = seed_seconds
        self.batches = 0
        self.fixed_s = fixed_s
        self.per_token_s = per_token_s

    # ------------------------------------------------------------------ estimates
    def predict(self, padded_tokens: float) -> float:
        """Expected seconds for one batch of `padded_tokens` on one worker."""
        return self.fixed_s + self.per_token_s * max(0.0, padded_tokens)

    @property
    def spread(self) -> float:
        """Relative spread (root mean square relative error) of recent predictions."""
        return math.sqrt(self._error_sq / self._error_weight)

    def upper(self, padded_tokens: float) -> float:
        """Seconds one batch of `padded_tokens` will take with little chance of more: for deadlines."""
        return self.predict(padded_tokens) * (1.0 + MARGIN_DEVIATIONS * self.spread)

    def tokens_within(self, seconds: float, *, safe: bool = False) -> int:
        """Most padded tokens one batch can hold and still be predicted (`upper` when `safe`) to take at most
        `seconds`; 0 when even an empty batch would not."""
        scale = 1.0 + MARGIN_DEVIATIONS * self.spread if safe else 1.0
        room = seconds / scale - self.fixed_s
        if room < 0:
            return 0
        if self.per_token_s <= 0:
            return 2 ** 62
        return int(min(room / self.per_token_s, 2 ** 62))

    # ------------------------------------------------------------------ learning
    def observe(self, padded_tokens: int, seconds: float) -> None:
        """Fold in one batch's measured duration (seconds on its worker) and refit."""
        if padded_tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        predicted = self.predict(padded_tokens)
        if predicted > 0:
            error = min(abs(seconds / predicted - 1.0), MAX_ERROR)
            self._error_sq = self.decay * self._error_sq + predicted * error * error
            self._error_weight = self.decay * self._error_weight + predicted
        seconds = min(seconds, MAX_RATIO * predicted) if predicted > 0 else seconds
        u = padded_tokens / self.token_scale
        for k, value in enumerate((1.0, u, u * u, seconds, u * seconds)):
            self._sums[k] = self.decay * self._sums[k] + value
        self._prior = max(MIN_PRIOR_WEIGHT, self.decay * self._prior)
        self.batches += 1
        self._refit()

    def _refit(self) -> None:
        fixed0, per_token0 = self.seed
        p = self._prior
        w, wu, wuu, wy, wuy = self._sums
        # Prior pseudo-observations: (u=0, y=fixed0) and (u=1, y=fixed0 + per_token0 * token_scale), weight p each.
        top = fixed0 + per_token0 * self.token_scale
        s0, s1, s2 = w + 2 * p, wu + p, wuu + p
        t0, t1 = wy + p * (fixed0 + top), wuy + p * top
        det = s0 * s2 - s1 * s1
        a = (t0 * s2 - s1 * t1) / det
        b = (s0 * t1 - s1 * t0) / det
        if b < 0:                    # no per-token cost: the weighted mean
            a, b = t0 / s0, 0.0
        if a < 0:                    # no fixed cost: a line through the origin
            a, b = 0.0, max(0.0, t1 / s2)
        self.fixed_s = a
        self.per_token_s = b / self.token_scale

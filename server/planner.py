"""Planning model work against a deadline: how long a request's items will take, and how many fit.

Pure functions over a batch cost estimate (`server/cost.py`), the times until each worker of the pool is free,
and the worker-seconds of work queued ahead. The batcher uses them to predict a new request's wait (fail fast)
and a latency-budgeted request uses `affordable_prefix` to choose how many of its candidates, in stage-1
order, to submit at once so that every worker shares them.

The arithmetic: queued work ahead is spread over the workers as they free up (water-filling: it can be cut
into batches anywhere); then the request's own items, longest first, are cut into batches by the batcher's
limits (`batch_fits`) and each batch goes to the worker that frees first (list scheduling). The finish is when
its last batch ends. Predicting a wait uses the expected cost (`predict`: a request is refused only when it is
expected to be late); planning against a budget adds a safety margin per worker, each batch's own margin
(`upper` - `predict`) added in quadrature: the errors of consecutive batches partly cancel, and the batcher
still checks each batch against the deadline with its full margin before starting it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol


class BatchCost(Protocol):
    """Seconds one batch of `padded_tokens` takes on one worker (see `cost.CostModel`)."""

    def predict(self, padded_tokens: float) -> float: ...

    def upper(self, padded_tokens: float) -> float: ...

    def tokens_within(self, seconds: float, *, safe: bool = False) -> int: ...


def batch_fits(size: int, longest: int, length: int, *, max_batch_size: int, max_batch_tokens: int,
               token_limit: int | None = None) -> bool:
    """Whether an item of `length` tokens may join a batch of `size` items whose longest has `longest` tokens:
    at most `max_batch_size` items and `max_batch_tokens` padded tokens (`token_limit` when lower); the first
    item of a batch always fits (an item longer than the token budget runs alone)."""
    if size == 0:
        return True
    limit = max_batch_tokens if token_limit is None else min(max_batch_tokens, token_limit)
    return size + 1 <= max_batch_size and (size + 1) * max(longest, length) <= limit


def split_batches(lengths: Sequence[int], *, max_batch_size: int, max_batch_tokens: int,
                  token_limit: int | None = None) -> list[int]:
    """Padded tokens of each batch one request's items make, taken longest first as the batcher takes them."""
    batches: list[int] = []
    size = longest = 0
    for length in sorted(lengths, reverse=True):
        if not batch_fits(size, longest, length, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                          token_limit=token_limit):
            batches.append(size * longest)
            size = longest = 0
        size, longest = size + 1, max(longest, length)
    if size:
        batches.append(size * longest)
    return batches


def fill(free_in: Sequence[float], work_s: float) -> list[float]:
    """When each worker is free after `work_s` worker-seconds of divisible work are spread over the workers as
    they free up (water-filling); `free_in` holds the seconds until each is free now."""
    free = sorted(max(0.0, f) for f in free_in)
    if not free:
        raise ValueError("fill: no workers")
    left = max(0.0, work_s)
    level = free[0]
    k = 1                                   # workers at the water level
    while left > 0:
        nxt = free[k] if k < len(free) else float("inf")
        room = (nxt - level) * k
        if room >= left:
            level += left / k
            left = 0.0
        else:
            left -= room
            level = nxt
            k += 1
    return [max(level, f) for f in free]


def finish_in(lengths: Sequence[int], *, cost: BatchCost, free_in: Sequence[float], ahead_s: float,
              max_batch_size: int, max_batch_tokens: int, safe: bool, token_limit: int | None = None) -> float:
    """Seconds from now until one request's items would all be done, after `ahead_s` worker-seconds of queued
    work; own batches costed with `cost.upper` when `safe`, else `cost.predict`."""
    ends = fill(free_in, ahead_s)          # expected end of each worker's work
    margins = [0.0] * len(ends)             # squared safety margin of the batches queued on each worker
    if not lengths:
        return 0.0
    for padded in split_batches(lengths, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                token_limit=token_limit):
        first = min(range(len(ends)), key=ends.__getitem__)
        expected = cost.predict(padded)
        ends[first] += expected
        if safe:
            margins[first] += (cost.upper(padded) - expected) ** 2
    return max(end + math.sqrt(margin) for end, margin in zip(ends, margins, strict=True))


def affordable_prefix(lengths: Sequence[int], *, time_left_s: float, cost: BatchCost, free_in: Sequence[float],
                      ahead_s: float, max_batch_size: int, max_batch_tokens: int) -> int:
    """How many of `lengths` (a prefix, in the given order) can be scored within `time_left_s`: the largest n
    whose items, submitted together behind `ahead_s` of queued work, are predicted (safely) to be done in time.
    Batches are cut no longer than the time left allows, as the batcher cuts them at a deadline."""
    token_limit = max(1, cost.tokens_within(time_left_s, safe=True))

    def fits(n: int) -> bool:
        return finish_in(lengths[:n], cost=cost, free_in=free_in, ahead_s=ahead_s, max_batch_size=max_batch_size,
                         max_batch_tokens=max_batch_tokens, safe=True, token_limit=token_limit) <= time_left_s

    if time_left_s <= 0:
        return 0
    # Exponential then binary search (the finish grows with n): the cost follows the answer, not len(lengths).
    lo, hi = 0, 1                           # fits(lo) holds
    while hi < len(lengths) and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, len(lengths))
    if hi == len(lengths) and fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo

"""Planner arithmetic (server/planner.py) with a fake cost model of known, round figures."""
from __future__ import annotations

import pytest

from twostage.server.planner import affordable_prefix, batch_fits, fill, finish_in, split_batches


class FakeCost:
    """1 ms per batch + 0.1 ms per padded token; `upper` is 1.5x the prediction."""

    def predict(self, padded_tokens: float) -> float:
        return 0.001 + 0.0001 * padded_tokens

    def upper(self, padded_tokens: float) -> float:
        return 1.5 * self.predict(padded_tokens)

    def tokens_within(self, seconds: float, *, safe: bool = False) -> int:
        return max(0, int(round((seconds / (1.5 if safe else 1.0) - 0.001) / 0.0001, 9)))


LIMITS = dict(max_batch_size=2, max_batch_tokens=1000)


def test_fill_spreads_divisible_work_over_workers_as_they_free_up():
    assert fill([0.0, 0.01], 0.03) == pytest.approx([0.02, 0.02])      # 0.01 alone, then 0.02 over both
    assert fill([0.0, 0.05], 0.01) == pytest.approx([0.01, 0.05])      # never reaches the busy worker
    assert fill([0.03, 0.0, 0.01], 0.0) == pytest.approx([0.0, 0.01, 0.03])
    assert fill([-1.0, 0.0], 0.02) == pytest.approx([0.01, 0.01])      # overdue batches count as free now
    with pytest.raises(ValueError):
        fill([], 1.0)


def test_batches_are_cut_longest_first_within_the_limits():
    assert split_batches([3, 9, 5, 7, 1], max_batch_size=2, max_batch_tokens=1000) == [18, 10, 1]
    assert split_batches([10, 10, 10], max_batch_size=8, max_batch_tokens=25) == [20, 10]
    assert split_batches([40, 5, 5], max_batch_size=8, max_batch_tokens=25) == [40, 10]   # too long: alone
    assert batch_fits(0, 0, 500, max_batch_size=1, max_batch_tokens=10)
    assert not batch_fits(2, 10, 10, max_batch_size=8, max_batch_tokens=100, token_limit=25)
    assert batch_fits(1, 10, 12, max_batch_size=8, max_batch_tokens=100, token_limit=25)


def test_finish_is_list_scheduling_behind_the_work_ahead():
    # 8 items of 10 tokens in batches of 2: four batches of 20 padded tokens, 3 ms each predicted.
    lengths = [10] * 8
    assert finish_in(lengths, cost=FakeCost(), free_in=[0, 0], ahead_s=0, safe=False, **LIMITS) == pytest.approx(0.006)
    # safe: each worker's two margins of 1.5 ms add in quadrature
    assert finish_in(lengths, cost=FakeCost(), free_in=[0, 0], ahead_s=0, safe=True,
                     **LIMITS) == pytest.approx(0.006 + 0.0015 * 2 ** 0.5)
    assert finish_in(lengths, cost=FakeCost(), free_in=[0], ahead_s=0, safe=False, **LIMITS) == pytest.approx(0.012)
    # 4 ms of queued work ahead takes 2 ms of each worker first
    assert finish_in(lengths, cost=FakeCost(), free_in=[0, 0], ahead_s=0.004, safe=False,
                     **LIMITS) == pytest.approx(0.008)
    # one worker busy for 10 ms more: three batches go to the free one, the last waits neither
    assert finish_in(lengths, cost=FakeCost(), free_in=[0, 0.010], ahead_s=0, safe=False,
                     **LIMITS) == pytest.approx(0.012)
    assert finish_in([], cost=FakeCost(), free_in=[0.5], ahead_s=9, safe=True, **LIMITS) == 0.0


def test_affordable_prefix_is_the_longest_prefix_that_fits():
    cost = FakeCost()
    lengths = [10] * 8              # safe finish on 2 workers, n = 1..8: 3, 4.5, 4.5, 4.5, 6.8, 8.12, 8.12, 8.12 ms
                                    # (in batches of 2; less time left cuts them to 1)
    plan = dict(cost=cost, free_in=[0, 0], ahead_s=0.0, **LIMITS)
    assert affordable_prefix(lengths, time_left_s=1.0, **plan) == 8
    assert affordable_prefix(lengths, time_left_s=0.0, **plan) == 0
    assert affordable_prefix(lengths, time_left_s=0.0029, **plan) == 0  # one item alone: 2 ms x 1.5
    assert affordable_prefix(lengths, time_left_s=0.004, **plan) == 2   # a pair would take 4.5: one per worker
    assert affordable_prefix(lengths, time_left_s=0.0046, **plan) == 4  # two batches of 2, one per worker
    assert affordable_prefix(lengths, time_left_s=0.0075, **plan) == 5
    assert affordable_prefix(lengths, time_left_s=0.0082, **plan) == 8
    for time_left in (0.003, 0.005, 0.0075, 0.012):
        n = affordable_prefix(lengths, time_left_s=time_left, **plan)
        limit = max(1, cost.tokens_within(time_left, safe=True))
        assert finish_in(lengths[:n], safe=True, token_limit=limit, **plan) <= time_left
        if n < len(lengths):
            assert finish_in(lengths[:n + 1], safe=True, token_limit=limit, **plan) > time_left


def test_affordable_prefix_counts_work_ahead_busy_workers_and_long_candidates():
    cost = FakeCost()
    lengths = [10] * 8
    idle = affordable_prefix(lengths, time_left_s=0.0091, cost=cost, free_in=[0, 0], ahead_s=0.0, **LIMITS)
    queued = affordable_prefix(lengths, time_left_s=0.0091, cost=cost, free_in=[0, 0], ahead_s=0.006, **LIMITS)
    busy = affordable_prefix(lengths, time_left_s=0.0091, cost=cost, free_in=[0.009, 0], ahead_s=0.0, **LIMITS)
    assert (idle, queued, busy) == (8, 4, 4)
    # a long candidate early in stage-1 order is paid for by every prefix that includes it
    skewed = [10, 200, 10, 10]                           # 200 tokens run alone: 21 ms x 1.5
    tight = dict(cost=cost, free_in=[0, 0], ahead_s=0.0, max_batch_size=2, max_batch_tokens=200)
    assert affordable_prefix(skewed, time_left_s=0.02, **tight) == 1
    assert affordable_prefix(skewed, time_left_s=0.04, **tight) == 4   # the short ones share the other worker

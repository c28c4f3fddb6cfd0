"""The online batch cost estimate (server/cost.py): seeded before data, recovers a linear cost, follows a model
that slows down, keeps its coefficients non-negative and measures its own spread. Durations are synthetic
(no sleeping): the fit is plain arithmetic."""
from __future__ import annotations

import random

import pytest

from twostage.server.cost import CostModel


def truth(fixed: float, per_token: float):
    return lambda tokens: fixed + per_token * tokens


def test_before_any_batch_the_estimate_is_the_seed():
    cost = CostModel(0.004, 0.0002, token_scale=256)
    assert cost.predict(0) == pytest.approx(0.004)
    assert cost.predict(100) == pytest.approx(0.004 + 0.02)
    assert cost.upper(100) > cost.predict(100)          # unmeasured: a wide margin
    assert cost.batches == 0


def test_recovers_fixed_and_per_token_cost_from_batches_of_several_sizes():
    cost = CostModel(0.01, 0.001, token_scale=256)      # seed far off on both
    actual = truth(0.003, 0.00002)
    rng = random.Random(1)
    for _ in range(200):
        tokens = rng.randint(16, 512)
        cost.observe(tokens, actual(tokens))
    assert cost.fixed_s == pytest.approx(0.003, rel=0.02)
    assert cost.per_token_s == pytest.approx(0.00002, rel=0.02)
    assert cost.spread < 0.05                            # exact data: the seed's error has faded
    assert cost.upper(256) == pytest.approx(actual(256), rel=0.1)


def test_follows_a_model_that_slows_down():
    cost = CostModel(0.002, 0.00005, memory=32, token_scale=256)
    rng = random.Random(2)
    before, after = truth(0.002, 0.00005), truth(0.003, 0.00015)   # the machine gets 2.5x slower per token
    for _ in range(100):
        tokens = rng.randint(32, 256)
        cost.observe(tokens, before(tokens))
    assert cost.predict(256) == pytest.approx(before(256), rel=0.02)
    for _ in range(5):
        tokens = rng.randint(32, 256)
        cost.observe(tokens, after(tokens))
    assert before(256) < cost.predict(256) < after(256)  # moving, not jumping on a few batches
    for _ in range(5):
        tokens = rng.randint(32, 256)
        cost.observe(tokens, after(tokens))
    assert cost.upper(256) > after(256)                  # the margin widens first: deadlines stay safe
    for _ in range(140):
        tokens = rng.randint(32, 256)
        cost.observe(tokens, after(tokens))
    assert cost.predict(256) == pytest.approx(after(256), rel=0.03)
    assert cost.predict(64) == pytest.approx(after(64), rel=0.05)


def test_batches_of_one_size_are_predicted_at_that_size_and_the_split_stays_non_negative():
    cost = CostModel(0.001, 0.0001, token_scale=256)
    for _ in range(60):
        cost.observe(200, 0.050)                         # 2.4x the seed's prediction, one size only
    assert cost.predict(200) == pytest.approx(0.050, rel=0.01)
    assert cost.fixed_s >= 0 and cost.per_token_s >= 0


def test_coefficients_are_clamped_at_zero():
    cost = CostModel(0.001, 0.0001, token_scale=256)
    for tokens in (100, 200, 300, 400) * 30:             # a line with a negative intercept
        cost.observe(tokens, -0.002 + 0.0001 * tokens)
    assert cost.fixed_s == 0.0
    assert cost.per_token_s == pytest.approx(0.0001 * 0.93, rel=0.05)   # the best line through the origin
    cost = CostModel(0.001, 0.0001, token_scale=256)
    for tokens in (100, 200, 300, 400) * 30:             # time falling with size: no per-token cost
        cost.observe(tokens, 0.02 - 0.00001 * tokens)
    assert cost.per_token_s == 0.0
    assert cost.fixed_s == pytest.approx(0.0175, rel=0.05)


def test_spread_measures_noise_and_upper_covers_most_batches():
    cost = CostModel(0.002, 0.0001, token_scale=256)
    rng = random.Random(3)
    actual = truth(0.002, 0.0001)
    for _ in range(300):
        tokens = rng.randint(32, 256)
        cost.observe(tokens, actual(tokens) * rng.uniform(0.9, 1.1))
    assert 0.03 < cost.spread < 0.09                     # uniform +-10 %: rms 5.8 %
    covered = 0
    for _ in range(500):
        tokens = rng.randint(32, 256)
        covered += actual(tokens) * rng.uniform(0.9, 1.1) <= cost.upper(tokens)
    assert covered >= 490


def test_a_stall_widens_the_margin_but_does_not_rewrite_the_estimate():
    cost = CostModel(0.002, 0.0001, token_scale=256)
    for _ in range(100):
        cost.observe(128, 0.0148)
    spread = cost.spread
    cost.observe(128, 0.5)                               # one 30x stall
    assert cost.spread > spread
    for _ in range(10):
        cost.observe(128, 0.0148)
    assert cost.predict(128) < 0.0148 * 1.5


def test_tokens_within_inverts_the_prediction():
    cost = CostModel(0.002, 0.0001, token_scale=256)
    assert cost.tokens_within(0.012) == 100
    assert cost.tokens_within(0.001) == 0
    assert cost.tokens_within(0.012, safe=True) < 100
    assert cost.predict(cost.tokens_within(0.0123)) <= 0.0123


def test_nonsense_measurements_are_ignored_and_bad_seeds_refused():
    cost = CostModel(0.002, 0.0001)
    cost.observe(0, 0.01)
    cost.observe(100, float("nan"))
    cost.observe(100, -1.0)
    assert cost.batches == 0 and cost.predict(100) == pytest.approx(0.012)
    with pytest.raises(ValueError, match="fixed_s"):
        CostModel(-1.0, 0.0001)
    with pytest.raises(ValueError, match="memory"):
        CostModel(0.001, 0.0001, memory=0.5)

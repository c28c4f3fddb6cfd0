"""Fusion arithmetic (server/fusion.py): RRF, convex combination, fused reranking."""
from __future__ import annotations

import math

import numpy as np
import pytest

from twostage.server import fusion
from twostage.server.fusion import Ranked


def ranked(*pairs: tuple[str, float]) -> list[Ranked]:
    return [Ranked(id=i, score=s, rank=r) for r, (i, s) in enumerate(pairs)]


def test_min_max_maps_best_to_one_and_worst_to_zero_and_flat_to_one():
    assert np.allclose(fusion.min_max([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    assert np.allclose(fusion.min_max([-0.2, -0.2]), [1.0, 1.0])
    assert fusion.min_max([]).size == 0


def test_rrf_sums_reciprocal_ranks_one_based():
    dense = ranked(("a", 0.9), ("b", 0.8), ("c", 0.1))
    lexical = ranked(("c", 12.0), ("a", 3.0))
    out = {f.id: f for f in fusion.rrf(dense, lexical, k=60)}
    assert math.isclose(out["a"].score, 1 / 61 + 1 / 62)
    assert math.isclose(out["b"].score, 1 / 62)
    assert math.isclose(out["c"].score, 1 / 63 + 1 / 61)
    assert [f.id for f in fusion.rrf(dense, lexical)] == ["a", "c", "b"]
    assert out["b"].lexical_rank is None and out["b"].dense_rank == 1
    assert out["c"].lexical_score == 12.0 and out["c"].dense_score == 0.1


def test_convex_normalizes_each_list_and_weights_them():
    dense = ranked(("a", 0.9), ("b", 0.7), ("c", 0.5))       # a 1, b .5, c 0
    lexical = ranked(("c", 20.0), ("d", 10.0), ("a", 0.0))   # c 1, d .5, a 0
    out = {f.id: f.score for f in fusion.convex(dense, lexical, 0.7)}
    assert math.isclose(out["a"], 0.7)
    assert math.isclose(out["b"], 0.35)
    assert math.isclose(out["c"], 0.3)
    assert math.isclose(out["d"], 0.15)
    only_lexical = [f.id for f in fusion.convex(dense, lexical, 0.0)]
    assert only_lexical[:2] == ["c", "d"]
    with pytest.raises(ValueError):
        fusion.convex(dense, lexical, 1.5)


def test_a_document_first_in_one_list_only_can_win_by_its_margin():
    # A rare exact term: far ahead lexically, absent from the dense list; a paraphrase: far ahead densely.
    dense = ranked(("para", 0.95), ("x", 0.40), ("y", 0.38), ("z", 0.35))
    lexical = ranked(("rare", 30.0), ("x", 4.0), ("y", 3.5), ("z", 3.0))
    top2 = {f.id for f in fusion.convex(dense, lexical, 0.5)[:2]}
    assert top2 == {"para", "rare"}


def test_ties_break_by_best_rank_then_id():
    dense = ranked(("b", 1.0), ("a", 1.0))
    out = fusion.convex(dense, [], 1.0)
    assert [f.id for f in out] == ["b", "a"]


def test_single_keeps_the_list_and_marks_its_kind():
    hits = ranked(("a", 2.0), ("b", 1.0))
    assert [(f.id, f.score, f.lexical_rank) for f in fusion.single(hits, "lexical")] == [("a", 2.0, 0), ("b", 1.0, 1)]
    assert all(f.lexical_rank is None for f in fusion.single(hits, "dense"))
    with pytest.raises(ValueError):
        fusion.single(hits, "sparse")


def test_rerank_fused_weight_one_is_the_cross_encoder_alone_and_zero_is_stage_one():
    ce = np.array([0.1, 0.9, 0.5])
    s1 = np.array([3.0, 1.0, 2.0])
    assert np.array_equal(fusion.rerank_fused(ce, s1, 1.0), ce)
    assert np.allclose(fusion.rerank_fused(ce, s1, 0.0), [1.0, 0.0, 0.5])
    mixed = fusion.rerank_fused(ce, s1, 0.5)
    assert np.allclose(mixed, [0.5 * 0.0 + 0.5 * 1.0, 0.5 * 1.0 + 0.5 * 0.0, 0.5 * 0.5 + 0.5 * 0.5])
    with pytest.raises(ValueError):
        fusion.rerank_fused(ce, s1[:2], 0.5)


def test_adaptive_weight_trusts_a_confident_cross_encoder_more():
    low = fusion.adaptive_rerank_weight([fusion.LOGIT_FROM - 3, -2.0])
    high = fusion.adaptive_rerank_weight([fusion.LOGIT_TO + 1, 0.0])
    mid = fusion.adaptive_rerank_weight([(fusion.LOGIT_FROM + fusion.LOGIT_TO) / 2])
    assert low == fusion.ADAPTIVE_LOW and high == fusion.ADAPTIVE_HIGH
    assert low < mid < high and math.isclose(mid, (fusion.ADAPTIVE_LOW + fusion.ADAPTIVE_HIGH) / 2)
    assert fusion.adaptive_rerank_weight([]) == fusion.ADAPTIVE_LOW

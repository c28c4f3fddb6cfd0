"""The shared retrieval measures (client/ir_metrics.py) by hand and against trec_eval itself (pytrec-eval-terrier
wraps trec_eval's C code): graded judgments, judged-irrelevant and unjudged documents, relevant documents never
retrieved, tied scores, queries with no relevant document and queries missing from the run."""
from __future__ import annotations

import math
import random

import pytest

from twostage.client.ir_metrics import evaluate_run, ndcg_at_k, recall_at_k


def test_ndcg_matches_a_hand_computed_value():
    judged = {"a": 3, "b": 1, "c": 2}
    # ranking b, x, a: gains 1, 0, 3 -> DCG = 1/log2(2) + 3/log2(4) = 2.5; ideal 3, 2, 1 -> 3 + 2/log2(3) + 1/2
    ideal = 3 + 2 / math.log2(3) + 0.5
    assert ndcg_at_k(["b", "x", "a"], judged, k=10) == pytest.approx(2.5 / ideal)
    assert ndcg_at_k(["a", "c", "b"], judged, k=10) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "a", "a"], judged, k=10) == pytest.approx(3 / ideal)  # repeats earn nothing
    assert ndcg_at_k(["x"], {"x": 0}, k=10) == 0.0


def test_recall_and_evaluate_average_over_queries():
    qrels = {"q1": {"a": 1, "b": 2, "z": 0}, "q2": {"c": 1}}
    assert recall_at_k(["a", "y"], qrels["q1"], k=100) == 0.5
    assert recall_at_k(["y", "c"], qrels["q2"], k=1) == 0.0
    out = evaluate_run({"q1": ["a", "b"], "q2": []}, qrels, ["q1", "q2"], ndcg_k=10, recall_k=100)
    assert out["recall@100"] == pytest.approx(0.5) and out["queries"] == 2
    assert out["ndcg@10"] == pytest.approx((ndcg_at_k(["a", "b"], qrels["q1"]) + 0.0) / 2)


# ------------------------------------------------------------------------------------ against trec_eval
def trec_order(scores: dict[str, float]) -> list[str]:
    """trec_eval's ranking of a scored run: score descending, ties by document id descending."""
    return sorted(scores, key=lambda d: (scores[d], d), reverse=True)


def reference(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], k_ndcg: int,
              k_recall: int) -> dict[str, dict[str, float]]:
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="the dev extra installs pytrec-eval-terrier")
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{k_ndcg}", f"recall.{k_recall}"})
    return {q: {"ndcg": m[f"ndcg_cut_{k_ndcg}"], "recall": m[f"recall_{k_recall}"]}
            for q, m in evaluator.evaluate(run).items()}


HAND_QRELS = {
    "graded": {"d1": 3, "d2": 2, "d3": 1, "d4": 0, "d5": 2},       # graded, one judged irrelevant
    "ties": {"t1": 1, "t2": 1, "t3": 0},
    "unfound": {"u1": 1, "u2": 2, "u3": 1},                       # relevant documents the run never returns
    "no-relevant": {"n1": 0, "n2": 0},                              # judged, nothing relevant
    "absent": {"a1": 1},                                            # missing from the run
}
HAND_RUN = {
    "graded": {"d4": 9.0, "x1": 8.0, "d3": 7.0, "d1": 6.0, "x2": 5.0, "d2": 4.0, "d5": 1.0},
    "ties": {"t1": 1.0, "t3": 1.0, "x9": 1.0, "t2": 0.5, "x1": 2.0},  # three-way tie at 1.0
    "unfound": {"x1": 3.0, "u2": 2.0, "x2": 1.0},
    "no-relevant": {"n1": 2.0, "x1": 1.0},
}


@pytest.mark.parametrize("k_ndcg, k_recall", [(10, 100), (3, 2), (1, 5)])
def test_hand_made_runs_match_trec_eval(k_ndcg, k_recall):
    ref = reference(HAND_QRELS, HAND_RUN, k_ndcg, k_recall)
    assert set(ref) == set(HAND_RUN)  # trec_eval leaves out the query the run lacks
    for q, scores in HAND_RUN.items():
        ranking = trec_order(scores)
        assert ndcg_at_k(ranking, HAND_QRELS[q], k_ndcg) == pytest.approx(ref[q]["ndcg"], abs=1e-12), q
        assert recall_at_k(ranking, HAND_QRELS[q], k_recall) == pytest.approx(ref[q]["recall"], abs=1e-12), q
    # the mean counts the absent query as 0 (trec_eval -c); trec_eval's own mean covers the run's queries only
    ours = evaluate_run({q: trec_order(s) for q, s in HAND_RUN.items()}, HAND_QRELS, list(HAND_QRELS), k_ndcg,
                        k_recall)
    assert ours["ndcg@" + str(k_ndcg)] == pytest.approx(sum(r["ndcg"] for r in ref.values()) / len(HAND_QRELS))
    assert ours["recall@" + str(k_recall)] == pytest.approx(sum(r["recall"] for r in ref.values()) / len(HAND_QRELS))


def test_tie_order_matters_and_is_the_callers():
    """Within a tie the order decides nDCG: the same scores ranked another way give another value."""
    ranking = trec_order(HAND_RUN["ties"])
    assert ranking[:4] == ["x1", "x9", "t3", "t1"]
    other = ["x1", "t1", "t3", "x9", "t2"]
    assert ndcg_at_k(other, HAND_QRELS["ties"]) != pytest.approx(ndcg_at_k(ranking, HAND_QRELS["ties"]))


def test_random_graded_runs_match_trec_eval():
    rng = random.Random(7)
    docs = [f"doc{i:03d}" for i in range(150)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(40):
        judged = rng.sample(docs, rng.randint(1, 30))
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        retrieved = rng.sample(docs, rng.randint(0, 120))
        run[f"q{q}"] = {d: float(rng.randint(0, 40)) for d in retrieved}  # coarse scores: many ties
    run = {q: s for q, s in run.items() if s}
    for k_ndcg, k_recall in ((10, 100), (5, 20)):
        ref = reference(qrels, run, k_ndcg, k_recall)
        for q, scores in run.items():
            ranking = trec_order(scores)
            assert ndcg_at_k(ranking, qrels[q], k_ndcg) == pytest.approx(ref[q]["ndcg"], abs=1e-12), q
            assert recall_at_k(ranking, qrels[q], k_recall) == pytest.approx(ref[q]["recall"], abs=1e-12), q

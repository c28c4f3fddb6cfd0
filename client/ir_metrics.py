"""Retrieval quality measures (standard definitions, written for this project), shared by `twostage evaluate`
and bench/.

nDCG@k uses linear gains (the judged grade) and a log2(rank + 1) discount, as trec_eval's ndcg_cut does; the ideal
ranking is every judged document with grade > 0, best grade first. recall@k counts documents with grade > 0.
A query's ranking is a list of document ids, best first; ids may be missing from the judgments (grade 0). How
tied scores are ordered is the caller's decision (trec_eval orders them by descending document id; twostage's
answers are already ranked). tests/test_ir_metrics.py checks these against trec_eval (pytrec-eval-terrier).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains) if g > 0)


def ndcg_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k of one ranking (0 when the query has no relevant document)."""
    ideal = dcg(sorted((g for g in judged.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    seen: set[str] = set()
    gains = []
    for doc in ranking[:k]:
        gains.append(judged.get(doc, 0) if doc not in seen else 0)  # a repeated id earns nothing
        seen.add(doc)
    return dcg(gains) / ideal


def recall_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int = 100) -> float:
    """Fraction of the relevant (grade > 0) documents found in the first k (0 when there are none)."""
    relevant = {d for d, g in judged.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant & set(ranking[:k])) / len(relevant)


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], queries: Sequence[str],
                 ndcg_k: int = 10, recall_k: int = 100) -> dict[str, float]:
    """Mean nDCG@ndcg_k and recall@recall_k over `queries` (a query missing from `run` scores 0, as with
    trec_eval -c; plain trec_eval averages over the queries present in the run only)."""
    if not queries:
        return {f"ndcg@{ndcg_k}": 0.0, f"recall@{recall_k}": 0.0, "queries": 0}
    nd = [ndcg_at_k(run.get(q, []), qrels.get(q, {}), ndcg_k) for q in queries]
    rc = [recall_at_k(run.get(q, []), qrels.get(q, {}), recall_k) for q in queries]
    return {f"ndcg@{ndcg_k}": sum(nd) / len(nd), f"recall@{recall_k}": sum(rc) / len(rc), "queries": len(queries)}

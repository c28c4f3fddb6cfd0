"""Score fusion: how stage-1 lists combine (hybrid retrieval) and how the cross-encoder's judgement combines
with stage 1 (fused reranking). Pure functions on plain values; the engine decides when to call them.

Stage 1. A hybrid search runs a dense (bi-encoder) and a lexical (BM25) search and fuses the two ranked lists:

* ``rrf``: reciprocal rank fusion, score = sum over lists of 1 / (k + rank), rank 1-based. Uses ranks only, so
  it needs no calibration, but it throws away how far apart the scores are.
* ``convex``: each list's scores are min-max normalized over that list (best = 1, worst returned = 0), a
  document missing from a list gets 0 for it, and score = w * dense + (1 - w) * lexical. Keeps score gaps: a
  document that is far ahead in one list stays ahead. w is the dense weight.

Stage 2. The cross-encoder's (normalized) scores and the stage-1 scores of the reranked candidates are each
min-max normalized over those candidates and mixed: final = w * ce + (1 - w) * stage1. w = 1 is the cross-
encoder alone. A fixed w is a compromise between collections where the cross-encoder is in its element and
ones where it is not; `adaptive_rerank_weight` sets w per query from the cross-encoder's own scores (no
labels): docs/benchmarks.md has the measurements behind the rule and its constants.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FUSIONS = ("rrf", "convex")
RRF_K = 60  # the constant of Cormack et al. (SIGIR 2009), also the common default of search engines


@dataclass(frozen=True)
class Ranked:
    """One entry of a stage-1 list: `score` higher is better, `rank` 0-based."""

    id: str
    score: float
    rank: int


@dataclass
class Fused:
    """A stage-1 candidate after fusion: its fused `score` and where it stood in each list (None: absent)."""

    id: str
    score: float
    dense_score: float | None = None
    dense_rank: int | None = None
    lexical_score: float | None = None
    lexical_rank: int | None = None


def min_max(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scores mapped to [0, 1] (best 1, worst 0); all equal (or a single score) -> all 1."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.ones_like(values)
    return (values - low) / (high - low)


def _collect(dense: Sequence[Ranked], lexical: Sequence[Ranked]) -> dict[str, Fused]:
    merged: dict[str, Fused] = {}
    for hit in dense:
        merged[hit.id] = Fused(id=hit.id, score=0.0, dense_score=hit.score, dense_rank=hit.rank)
    for hit in lexical:
        entry = merged.setdefault(hit.id, Fused(id=hit.id, score=0.0))
        entry.lexical_score, entry.lexical_rank = hit.score, hit.rank
    return merged


def _ordered(merged: dict[str, Fused]) -> list[Fused]:
    """Best fused score first; ties by the better of the two ranks, then by id (deterministic)."""
    def best_rank(f: Fused) -> int:
        return min(r for r in (f.dense_rank, f.lexical_rank) if r is not None)
    return sorted(merged.values(), key=lambda f: (-f.score, best_rank(f), f.id))


def rrf(dense: Sequence[Ranked], lexical: Sequence[Ranked], k: int = RRF_K) -> list[Fused]:
    """Reciprocal rank fusion of two lists (ranks 0-based in, 1-based in the formula)."""
    if k <= 0:
        raise ValueError(f"rrf: k must be > 0 (got {k})")
    merged = _collect(dense, lexical)
    for f in merged.values():
        f.score = sum(1.0 / (k + rank + 1) for rank in (f.dense_rank, f.lexical_rank) if rank is not None)
    return _ordered(merged)


def convex(dense: Sequence[Ranked], lexical: Sequence[Ranked], dense_weight: float) -> list[Fused]:
    """Convex combination of the two lists' min-max normalized scores (missing from a list = 0 for it)."""
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"convex: dense_weight must be in [0, 1] (got {dense_weight})")
    merged = _collect(dense, lexical)
    dense_norm = dict(zip((h.id for h in dense), min_max([h.score for h in dense])))
    lexical_norm = dict(zip((h.id for h in lexical), min_max([h.score for h in lexical])))
    for f in merged.values():
        f.score = float(dense_weight * dense_norm.get(f.id, 0.0) + (1.0 - dense_weight) * lexical_norm.get(f.id, 0.0))
    return _ordered(merged)


def single(hits: Sequence[Ranked], kind: str) -> list[Fused]:
    """One list (dense or lexical mode) in the same shape as a fused one: the score is the list's own."""
    if kind == "dense":
        return [Fused(id=h.id, score=h.score, dense_score=h.score, dense_rank=h.rank) for h in hits]
    if kind == "lexical":
        return [Fused(id=h.id, score=h.score, lexical_score=h.score, lexical_rank=h.rank) for h in hits]
    raise ValueError(f"single: kind must be 'dense' or 'lexical' (got {kind!r})")


def fuse(dense: Sequence[Ranked], lexical: Sequence[Ranked], method: str, dense_weight: float) -> list[Fused]:
    """The hybrid list by `method` ("rrf" or "convex")."""
    if method == "rrf":
        return rrf(dense, lexical)
    if method == "convex":
        return convex(dense, lexical, dense_weight)
    raise ValueError(f"fusion method {method!r} not one of {FUSIONS}")


def rerank_fused(ce_scores: Sequence[float] | np.ndarray, stage1_scores: Sequence[float] | np.ndarray,
                 weight: float) -> np.ndarray:
    """Final scores of reranked candidates: weight * minmax(ce) + (1 - weight) * minmax(stage1), both over
    the same candidates. weight 1 keeps the cross-encoder's order exactly (its own scores are returned)."""
    ce = np.asarray(ce_scores, dtype=np.float64)
    if ce.shape != np.asarray(stage1_scores).shape:
        raise ValueError("rerank_fused: one stage-1 score per cross-encoder score")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"rerank_fused: weight must be in [0, 1] (got {weight})")
    if weight == 1.0:
        return ce
    return weight * min_max(ce) + (1.0 - weight) * min_max(stage1_scores)


# Query-adaptive cross-encoder weight. A cross-encoder in its element gives its best candidate a high raw score
# (logit) and deserves the say; out of its element its scores stay low and flat and stage 1 keeps more say:
#   w = ADAPTIVE_LOW + (ADAPTIVE_HIGH - ADAPTIVE_LOW) * clip((top logit - LOGIT_FROM) / (LOGIT_TO - LOGIT_FROM), 0, 1)
# The constants fit ms-marco-MiniLM-L-12-v2's logit scale (docs/benchmarks.md#hybrid-retrieval has the figures and
# how they were chosen); another cross-encoder needs its own, which `twostage evaluate --tune` measures.
ADAPTIVE_LOW = 0.4
ADAPTIVE_HIGH = 1.0
LOGIT_FROM = 6.0
LOGIT_TO = 8.0


def adaptive_rerank_weight(ce_raw: Sequence[float] | np.ndarray) -> float:
    """The cross-encoder weight for one query from its raw scores (logits) over the reranked hits."""
    scores = np.asarray(ce_raw, dtype=np.float64)
    if scores.size == 0:
        return ADAPTIVE_LOW
    trust = float(np.clip((scores.max() - LOGIT_FROM) / (LOGIT_TO - LOGIT_FROM), 0.0, 1.0))
    return ADAPTIVE_LOW + (ADAPTIVE_HIGH - ADAPTIVE_LOW) * trust

"""The embedded backend's vector search: the usearch HNSW graph with writes staged out of sight, and exact search.

Scores. A score is a similarity, higher is closer: for `cos` it is the cosine (1 - usearch distance); for `ip`
the inner product (usearch reports 1 - dot, so again 1 - distance); for `l2sq` it is minus the squared
Euclidean distance. `similarity` converts usearch distances, `exact_similarity` computes the same from vectors.

Staging. A write first adds its new vectors to the graph in small chunks while searches go on; those keys are
"pending" and every search skips them (it asks usearch for that many more results). Once the write has
committed, `publish` removes the replaced or deleted keys and makes the pending ones visible; `unstage` takes
them out again when the write fails. usearch calls are serialized (the Python binding shares one per-thread
search context between callers).
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

# onnxruntime must be loaded before usearch: with usearch 2.26 + onnxruntime 1.32, `import usearch.index`
# followed by `import onnxruntime` crashes the process (segfault in libstdc++'s codecvt during onnxruntime's
# static initialisation). Importing onnxruntime first is safe; tests/test_contract.py guards the order.
import onnxruntime  # noqa: F401,E402  isort: skip
from usearch.index import BatchMatches, Index, Matches  # noqa: E402

from .settings import IndexSettings

ADD_CHUNK = 32  # vectors added to the graph per usearch call during a write (searches interleave)


def new_graph(dimension: int, settings: IndexSettings) -> Index:
    """An empty HNSW graph with `settings`."""
    s = settings
    return Index(ndim=dimension, metric=s.metric, dtype=s.dtype, connectivity=s.connectivity,
                 expansion_add=s.expansion_add, expansion_search=s.expansion_search)


def graph_keys(hnsw: Index) -> np.ndarray:
    """Every key in `hnsw` (unordered)."""
    if len(hnsw) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.asarray(hnsw._compiled.get_keys_in_slice(), dtype=np.uint64)


def similarity(metric: str, distances: np.ndarray) -> np.ndarray:
    """usearch distances -> scores (see the module docstring)."""
    d = np.asarray(distances, dtype=np.float64)
    return -d if metric == "l2sq" else 1.0 - d


def exact_similarity(metric: str, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(q, n) scores of each query (d,) or (q, d) against each row of `vectors`, as `similarity` defines them."""
    q = np.atleast_2d(queries).astype(np.float32)
    if metric == "ip":
        return q @ vectors.T
    if metric == "cos":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        return qn @ vn.T
    sq = (q * q).sum(axis=1, keepdims=True) + (vectors * vectors).sum(axis=1)[None, :] - 2.0 * (q @ vectors.T)
    return -np.maximum(sq, 0.0)


def exact_top_k(metric: str, queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over streamed (keys, vectors) chunks: the (q, <=k) best keys and their scores per query, best
    first. Holds only k candidates per query between chunks."""
    queries = np.atleast_2d(queries)
    best_keys = np.zeros((len(queries), 0), dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float64)
    for keys, vectors in chunks:
        scores = exact_similarity(metric, queries, vectors).astype(np.float64)
        best_keys = np.concatenate([best_keys, np.broadcast_to(keys.astype(np.int64), scores.shape)], axis=1)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        if best_keys.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_keys = np.take_along_axis(best_keys, keep, axis=1)
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_keys, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


class Graph:
    """An HNSW graph in memory whose staged (uncommitted) keys no search returns. The caller orders writes
    (one at a time) and excludes searches while it calls `publish`."""

    def __init__(self, hnsw: Index):
        self.hnsw = hnsw
        self._mutex = threading.Lock()  # usearch calls, one at a time
        self._pending: set[int] = set()  # keys in the graph whose write has not committed yet

    def __len__(self) -> int:
        return len(self.hnsw)

    def keys(self) -> np.ndarray:
        with self._mutex:
            return graph_keys(self.hnsw)

    def search(self, queries: np.ndarray, count: int, expansion: int | None,
               threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, usearch distances) per query, best first, at most `count` each, pending keys skipped. When the
        graph holds no more vectors than the search would visit (expansion_search), usearch compares against all
        of them instead: as cheap, and exact (after many replacements an HNSW graph can leave a node
        unreachable)."""
        queries = queries.reshape(-1, self.hnsw.ndim)
        with self._mutex:
            hnsw = self.hnsw
            pending = np.fromiter(self._pending, dtype=np.uint64, count=len(self._pending))
            default = hnsw.expansion_search
            if expansion and expansion != default:
                hnsw.expansion_search = int(expansion)  # type: ignore[misc]  # usearch's setter is declared apart
            try:
                found = hnsw.search(queries, count + len(pending), threads=threads,
                                    exact=len(hnsw) <= hnsw.expansion_search)
            finally:
                if expansion and expansion != default:
                    hnsw.expansion_search = default  # type: ignore[misc]
        rows = [found[i] for i in range(len(found))] if isinstance(found, BatchMatches) else [found]
        out = []
        for m in rows:
            assert isinstance(m, Matches)
            keys, distances = np.asarray(m.keys, dtype=np.uint64), np.asarray(m.distances)
            if len(pending):
                visible = ~np.isin(keys, pending)
                keys, distances = keys[visible], distances[visible]
            out.append((keys[:count], distances[:count]))
        return out

    def stage(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors as pending, ADD_CHUNK at a time so that searches interleave."""
        for start in range(0, len(keys), ADD_CHUNK):
            chunk = keys[start:start + ADD_CHUNK]
            with self._mutex:
                self._pending.update(chunk.tolist())
                self.hnsw.add(chunk, vectors[start:start + ADD_CHUNK], threads=0)

    def unstage(self) -> None:
        """Take the pending keys out of the graph again (their write failed)."""
        with self._mutex:
            staged = [key for key in self._pending if self.hnsw.contains(key)]
            if staged:
                self.hnsw.remove(np.array(staged, dtype=np.uint64))
            self._pending.clear()

    def publish(self, remove: Sequence[int]) -> None:
        """The write committed: remove the keys it replaced or deleted and make the pending keys visible."""
        with self._mutex:
            if len(remove):
                self.hnsw.remove(np.array(remove, dtype=np.uint64))
            self._pending.clear()

    def reset(self) -> None:
        with self._mutex:
            self.hnsw.reset()

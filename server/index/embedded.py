"""The embedded backend: a usearch HNSW graph in memory and a SQLite document store in one directory.

Layout of the directory: layout.py. Store and durability: store.py. Snapshots of the graph and how they are
brought up to date on open: snapshot.py. Graph, staging and scores: ann.py.

Durability. An upsert or delete is acknowledged only after its SQLite transaction has committed (WAL,
synchronous=FULL), and every committed transaction bumps the change sequence. The graph is written as a snapshot
now and then (`save`, `maybe_save`, `close`); on open it is brought up to date with the store, so a crash loses
nothing acknowledged.

Concurrency. One writer at a time (a mutex). A write first stages its new vectors in the graph while searches
go on (hidden from them); then, under the write side of a readers-writer lock, the transaction commits and the
graph is made to match it. Searches hold the read side, so a search sees the whole of a write or none of it,
and is held up only for the commit (one fsync) and the removals. Snapshots are written while searches go on
(writers wait).

Inputs are validated by the engine (filters, k, expansion_search, documents and vectors); this class takes them
as given.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from twostage.server.errors import FailedPrecondition

from . import snapshot
from .ann import Graph, exact_top_k, similarity
from .backend import Candidate, Candidates, Filter, StoredDoc
from .filters import filter_sql, metadata_matches
from .layout import STORE_FILE, DirectoryLock, recover_index_dir
from .lexical import match_expression, query_terms
from .settings import IndexSettings
from .store import DocumentStore

log = logging.getLogger("twostage.index")

# A filtered search switches from widening HNSW rounds to scanning the matching documents when the
# candidates it expects to need exceed this fraction of the index.
SCAN_FRACTION = 0.125


class _RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class DocumentIndex:
    """HNSW graph + SQLite document store kept in step; an `IndexBackend` (and `Snapshotting`). Open with
    `DocumentIndex.open`."""

    kind = "embedded"

    def __init__(self, path: Path, dimension: int, settings: IndexSettings, store: DocumentStore,
                 lock: DirectoryLock, loaded: snapshot.Loaded):
        self.path = path
        self._dimension = dimension
        self._settings = settings
        self._store = store
        self._lock = lock
        hnsw = loaded.hnsw
        hnsw.expansion_search = settings.expansion_search  # type: ignore[misc]  # usearch's setter is declared apart
        if not settings.view:
            hnsw.expansion_add = settings.expansion_add  # type: ignore[misc]
        self._graph: Graph | None = Graph(hnsw)
        self._rw = _RWLock()
        self._write_mutex = threading.Lock()  # one writer (or snapshot) at a time
        self._count = len(hnsw)  # committed documents (the graph may also hold staged keys)
        self._seq = loaded.seq  # store sequence the in-memory graph reflects
        self._snapshot_seq = loaded.snapshot_seq  # sequence of the snapshot on disk (-1: none valid)
        self._last_save = time.monotonic()
        self._failed: str | None = None
        self._closed = False
        self.opened_from = loaded.how  # how the graph was obtained at open (for logs and tests)

    @classmethod
    def open(cls, path: Path | str, dimension: int, settings: IndexSettings) -> DocumentIndex:
        """Open (creating when missing, unless settings.view) the index in directory `path`."""
        path = Path(path)
        if dimension <= 0:
            raise ValueError(f"dimension must be > 0 (got {dimension})")
        recovered = recover_index_dir(path)
        if recovered:
            log.warning(recovered)
        if settings.view:
            if not (path / STORE_FILE).is_file():
                raise FailedPrecondition(f"no index in {path} to open read-only (index_view)")
        else:
            path.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(path, exclusive=not settings.view)
        try:
            store = DocumentStore(path / STORE_FILE, dimension, settings.metric, writable=not settings.view)
        except BaseException:
            lock.release()
            raise
        try:
            loaded = snapshot.load(path, store, dimension, settings, lock)
        except BaseException:
            store.close()
            lock.release()
            raise
        return cls(path, dimension, settings, store, lock, loaded)

    # ------------------------------------------------------------------ properties
    @property
    def size(self) -> int:
        """Documents in the index."""
        return self._count

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def settings(self) -> IndexSettings:
        return self._settings

    @property
    def read_only(self) -> bool:
        return self._settings.view

    @property
    def sequence(self) -> int:
        """Change sequence of the last committed write."""
        return self._seq

    def describe(self) -> dict[str, str]:
        s = self._settings
        return {"kind": self.kind, "path": str(self.path), "metric": s.metric, "dtype": s.dtype,
                "connectivity": str(s.connectivity), "expansion_add": str(s.expansion_add),
                "expansion_search": str(s.expansion_search), "filter_overfetch": str(s.filter_overfetch),
                "view": str(s.view).lower()}

    def verify(self) -> int:
        """Check that the HNSW keys and the store keys are the same set and that the lexical index holds the
        stored texts' words; returns the document count."""
        with self._write_mutex, self._rw.read():
            graph = self._open_graph()
            keys = graph.keys()
            stored = self._store.keys()
            if not (len(keys) == len(stored) == self._count and np.array_equal(np.sort(keys), np.sort(stored))):
                raise FailedPrecondition(f"index {self.path}: HNSW keys and document store keys differ")
            if not self._store.lexical_in_step():
                raise FailedPrecondition(f"index {self.path}: the lexical index differs from the stored texts")
            return self.size

    def _open_graph(self) -> Graph:
        if self._closed or self._graph is None:
            raise FailedPrecondition(f"index {self.path} is closed")
        return self._graph

    # ------------------------------------------------------------------ search
    def search(self, vector: np.ndarray, k: int, *, filter: Filter | None = None,
               expansion_search: int | None = None) -> Candidates:
        """The k nearest documents to `vector` (matching `filter`, when given, on metadata): ids and scores.
        Reads no document rows but, with a filter, the metadata of the rows it considers."""
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(self._dimension)
        with self._rw.read():
            graph = self._open_graph()
            n = self.size
            if n == 0:
                return Candidates([], exhausted=bool(filter), strategy="empty")
            if not filter:
                keys, distances = graph.search(q, min(k, n), expansion_search)[0]
                return Candidates(self._candidates(keys, distances, self._store.ids_of(keys)), strategy="ann")
            return self._filtered_search(graph, q, k, n, expansion_search, filter)

    def _candidates(self, keys: np.ndarray, distances: np.ndarray, ids: dict[int, str],
                    limit: int | None = None) -> list[Candidate]:
        """Candidates for those of `keys` found in `ids` (key -> id), in order, at most `limit`."""
        out: list[Candidate] = []
        for key, score in zip(keys.tolist(), similarity(self._settings.metric, distances).tolist(), strict=True):
            if key in ids:
                out.append(Candidate(ids[key], score, len(out)))
                if limit is not None and len(out) == limit:
                    break
        return out

    def _filtered_search(self, graph: Graph, q: np.ndarray, k: int, n: int, expansion: int | None,
                         flt: Filter) -> Candidates:
        """Widening HNSW rounds while the filter lets enough through; an exact scan of the matching documents
        when it is too selective for that."""
        condition, params = filter_sql(flt)
        fetch = min(n, k * self._settings.filter_overfetch)
        while True:
            keys, distances = graph.search(q, fetch, expansion)[0]
            rows = self._store.rows_of(keys, condition, params)
            ids = {key: doc_id for key, (doc_id, meta) in rows.items() if metadata_matches(json.loads(meta), flt)}
            if len(ids) >= k:
                return Candidates(self._candidates(keys, distances, ids, limit=k), strategy="ann")
            if fetch >= n:
                if len(keys) >= n:  # the graph gave back every document: the matches are all there are
                    return Candidates(self._candidates(keys, distances, ids), exhausted=True, strategy="ann-all")
                break
            selectivity = len(ids) / max(len(keys), 1)
            needed = k / selectivity if selectivity else math.inf
            if needed > n * SCAN_FRACTION:
                break
            fetch = min(n, max(2 * fetch, math.ceil(needed * 1.25)))
        return self._scan_search(q, k, flt, condition, params)

    def _scan_search(self, q: np.ndarray, k: int, flt: Filter, condition: str, params: list[object]) -> Candidates:
        """Exact search over the documents matching the filter (for selective filters)."""
        matched = 0

        def matching() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            nonlocal matched
            for rows in self._store.scan(condition, params):
                rows = [r for r in rows if metadata_matches(json.loads(r[2]), flt)]
                matched += len(rows)
                if rows:
                    yield (np.array([r[0] for r in rows], dtype=np.uint64),
                           self._store.matrix([r[3] for r in rows]))

        keys, scores = exact_top_k(self._settings.metric, q, matching(), k)
        ids = self._store.ids_of(keys[0])
        hits = [Candidate(ids[int(key)], float(score), rank)
                for rank, (key, score) in enumerate(zip(keys[0], scores[0], strict=True))]
        return Candidates(hits, exhausted=matched < k, strategy="scan")

    def lexical_search(self, text: str, k: int, *, filter: Filter | None = None) -> Candidates:
        """The k documents that score best by BM25 for the words of `text` (matching `filter`, when given):
        ids and scores (-bm25(), positive, higher is better). Any word may match (OR); stop words are dropped;
        a text with no words left finds nothing. `exhausted`: a filter was given and fewer than k documents
        match both it and a word of `text`."""
        terms = query_terms(text)
        with self._rw.read():
            self._open_graph()
            if not terms:
                return Candidates([], exhausted=bool(filter), strategy="lexical-no-terms")
            match = match_expression(terms)
            if not filter:
                rows = self._store.lexical_top(match, k)
                return Candidates([Candidate(doc_id, score, rank) for rank, (doc_id, score) in enumerate(rows)],
                                  strategy="lexical")
            condition, params = filter_sql(filter)
            hits: list[Candidate] = []
            scan = self._store.lexical_scan(match, condition, params)
            try:
                for batch in scan:
                    for doc_id, meta, score in batch:
                        if metadata_matches(json.loads(meta), filter):
                            hits.append(Candidate(doc_id, score, len(hits)))
                            if len(hits) == k:
                                return Candidates(hits, strategy="lexical-filtered")
            finally:
                scan.close()
            return Candidates(hits, exhausted=True, strategy="lexical-filtered")

    # ---------------------------------------------- evaluation helpers (bench/ and tests; not IndexBackend)
    def search_batch(self, vectors: np.ndarray, k: int, *, expansion_search: int | None = None) -> list[Candidates]:
        """Unfiltered ANN search for many queries at once on all cores (recall measurements)."""
        qs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self._dimension)
        with self._rw.read():
            graph = self._open_graph()
            n = self.size
            if n == 0:
                return [Candidates([], strategy="empty") for _ in range(len(qs))]
            found = graph.search(qs, min(k, n), expansion_search, threads=0)
            ids = self._store.ids_of(np.unique(np.concatenate([keys for keys, _ in found])))
            return [Candidates(self._candidates(keys, distances, ids), strategy="ann") for keys, distances in found]

    def exact_search(self, vector: np.ndarray, k: int) -> Candidates:
        """Brute-force search over the stored float32 vectors (ground truth for recall)."""
        return self.exact_search_batch(np.asarray(vector, dtype=np.float32)[None, :], k)[0]

    def exact_search_batch(self, vectors: np.ndarray, k: int) -> list[Candidates]:
        """Brute-force search for many queries, streaming the stored vectors once."""
        qs = np.asarray(vectors, dtype=np.float32).reshape(-1, self._dimension)
        with self._rw.read():
            self._open_graph()
            keys, scores = exact_top_k(self._settings.metric, qs, self._store.iter_vectors(), k)
            ids = self._store.ids_of(np.unique(keys))
        return [Candidates([Candidate(ids[int(key)], float(score), rank)
                            for rank, (key, score) in enumerate(zip(keys[i], scores[i], strict=True))],
                           strategy="exact")
                for i in range(len(qs))]

    # ------------------------------------------------------------------ reads
    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        """Stored documents by id (ids not stored are absent from the result)."""
        self._open_graph()
        return self._store.get(list(dict.fromkeys(ids)))

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Those of `ids` that are stored (index build's resume)."""
        self._open_graph()
        return set(self._store.existing(list(dict.fromkeys(ids))))

    # ------------------------------------------------------------------ writes
    def _writable_graph(self) -> Graph:
        graph = self._open_graph()
        if self._settings.view:
            raise FailedPrecondition(
                f"index {self.path} is open read-only (index_view); Upsert and Delete are refused")
        if self._failed:
            raise FailedPrecondition(f"index {self.path} is out of step with its store ({self._failed}); "
                                     f"restart the server to recover")
        return graph

    def upsert(self, docs: Sequence[StoredDoc], vectors: np.ndarray) -> tuple[int, int]:
        """Insert or replace `docs` (row i of `vectors` is docs[i]'s embedding), all or nothing.
        Returns (inserted, updated). Durable when it returns."""
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.shape != (len(docs), self._dimension):  # an invariant the engine's validation keeps
            raise ValueError(f"{len(docs)} documents but vectors of shape {matrix.shape}; "
                             f"expected ({len(docs)}, {self._dimension})")
        with self._write_mutex:
            graph = self._writable_graph()
            store = self._store
            store.writer.execute("BEGIN IMMEDIATE")
            try:
                old = store.existing([d.id for d in docs], store.writer)
                store.remove(list(old.values()))
                new_keys = store.insert(docs, matrix)
                seq = store.bump_seq()
            except BaseException:
                store.writer.execute("ROLLBACK")
                raise
            self._commit_and_apply(graph, seq, remove=list(old.values()),
                                   add=(np.array(new_keys, dtype=np.uint64), matrix))
        return len(docs) - len(old), len(old)

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove documents by id, all or nothing. Returns (deleted, ids that were not stored)."""
        ids = list(dict.fromkeys(ids))
        with self._write_mutex:
            graph = self._writable_graph()
            store = self._store
            store.writer.execute("BEGIN IMMEDIATE")
            try:
                old = store.existing(ids, store.writer)
                if not old:
                    store.writer.execute("ROLLBACK")
                    return 0, ids
                store.remove(list(old.values()))
                seq = store.bump_seq()
            except BaseException:
                store.writer.execute("ROLLBACK")
                raise
            self._commit_and_apply(graph, seq, remove=list(old.values()), add=None)
        return len(old), [i for i in ids if i not in old]

    def _commit_and_apply(self, graph: Graph, seq: int, remove: list[int],
                          add: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Stage the new vectors in the graph (hidden from searches), then commit the open transaction
        and make the graph match it, with searches held off only for that last step."""
        conn = self._store.writer
        added = 0
        try:
            if add is not None:
                graph.stage(*add)
                added = len(add[0])
        except BaseException:
            graph.unstage()
            conn.execute("ROLLBACK")
            raise
        with self._rw.write():
            try:
                conn.execute("COMMIT")
            except BaseException:
                graph.unstage()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                graph.publish(remove)
                self._count += added - len(remove)
                self._seq = seq
            except BaseException as exc:  # committed but not applied: refuse further writes
                self._failed = f"applying write {seq} to the graph failed: {exc}"
                log.error("index %s: %s", self.path, self._failed)
                raise

    # ------------------------------------------------------------------ snapshots
    def save(self) -> bool:
        """Write a snapshot of the graph if it changed since the last one; True if one was written."""
        graph = self._open_graph()
        if self._settings.view:
            return False
        with self._write_mutex:
            if self._failed or self._seq == self._snapshot_seq:
                self._last_save = time.monotonic()
                return False
            snapshot.write_snapshot(self.path, graph.hnsw, self._seq, self._dimension, self._settings)
            self._snapshot_seq = self._seq
            self._last_save = time.monotonic()
            return True

    def maybe_save(self, interval_s: float) -> bool:
        """`save` when at least `interval_s` seconds passed since the last snapshot (server timer)."""
        if self._settings.view or time.monotonic() - self._last_save < interval_s:
            return False
        return self.save()

    def close(self) -> None:
        """Snapshot if needed, then release files and the directory lock."""
        if self._closed:
            return
        try:
            if not self._settings.view and self._graph is not None:
                self.save()
        finally:
            self._closed = True
            with self._write_mutex, self._rw.write():
                self._store.close()
                if self._graph is not None:
                    self._graph.reset()
                    self._graph = None
                self._lock.release()

    def __enter__(self) -> DocumentIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

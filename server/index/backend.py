"""The seam between the engine and stage 1: what a Search, Rerank-by-id, Upsert and Delete need from an index.

`IndexBackend` is the whole contract; the engine depends on it and on nothing else of this package. Today one
implementation exists, `embedded.DocumentIndex` (usearch HNSW + SQLite in one directory). The engine validates
every request before it reaches a backend (filters, k, expansion_search, documents and their vectors), so a
backend takes its inputs as given.

Maintenance a backend may offer beyond the contract (snapshots of an in-memory graph) is a separate, optional
capability, `Snapshotting`, that the app wiring checks for; the engine never calls it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# A metadata filter as the engine passes it on after validation: top-level metadata keys and the JSON scalar
# each must equal (see filters.metadata_matches for what "equal" means).
FilterValue = str | int | float | bool | None
Filter = dict[str, FilterValue]
# A document's metadata: a JSON object.
Metadata = dict[str, object]


@dataclass
class StoredDoc:
    """A document as stored (the vector is kept beside it, not in this object)."""

    id: str
    text: str
    title: str = ""
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A stage-1 hit before its document is fetched: `score` is a similarity (higher is closer) or, from a
    lexical search, a BM25 score (higher is better), `rank` its 0-based position in its list."""

    id: str
    score: float
    rank: int


@dataclass
class Candidates:
    """Stage-1 hits, best first. `exhausted`: a filter left fewer than k matching documents in the whole index.
    `strategy`: how the backend found them (for logs and tests; embedded: "ann", "ann-all", "scan", "empty",
    and for lexical searches "lexical", "lexical-filtered", "lexical-no-terms")."""

    hits: list[Candidate]
    exhausted: bool = False
    strategy: str = ""


class IndexBackend(Protocol):
    """Documents and their vectors, searchable by similarity (and by words, BM25) with an optional metadata
    filter.

    Writes are atomic (a search sees all of an upsert or delete or none of it) and durable when they return.
    """

    kind: str  # "embedded" (usearch + SQLite); other backends name themselves

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        ...

    @property
    def size(self) -> int:
        """Documents stored."""
        ...

    @property
    def read_only(self) -> bool:
        """True when upsert and delete are refused."""
        ...

    def search(self, vector: np.ndarray, k: int, *, filter: Filter | None = None,
               expansion_search: int | None = None) -> Candidates:
        """The k documents nearest to `vector` (those matching `filter`, when given): ids and scores only."""
        ...

    def lexical_search(self, text: str, k: int, *, filter: Filter | None = None) -> Candidates:
        """The k documents that score best by BM25 for the words of `text` (those matching `filter`, when
        given): ids and scores (BM25, positive, higher is better). Any word of `text` may match; the backend
        analyses `text` itself and never reads it as query syntax; a text with no searchable words finds
        nothing. Writes reach it atomically with the rest: a document listed here has its row stored as of the
        same moment. `exhausted`: a filter was given and fewer than k documents match both it and the text."""
        ...

    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        """Stored documents by id; ids not stored are absent from the result."""
        ...

    def upsert(self, docs: Sequence[StoredDoc], vectors: np.ndarray) -> tuple[int, int]:
        """Insert or replace `docs` (row i of `vectors` is docs[i]'s vector), all or nothing: (inserted, updated)."""
        ...

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove documents by id, all or nothing: (deleted, the ids that were not stored)."""
        ...

    def describe(self) -> dict[str, str]:
        """The backend kind (key "kind") and its settings, for Info and logs."""
        ...

    def close(self) -> None:
        """Release files and connections; writes already returned stay durable."""
        ...


@runtime_checkable
class Snapshotting(Protocol):
    """Optional capability of a backend that keeps state in memory and writes it out now and then (the embedded
    backend's HNSW graph). The server calls `maybe_save` on a timer; a backend without it needs no timer."""

    def maybe_save(self, interval_s: float) -> bool:
        """Write a snapshot when at least `interval_s` seconds passed since the last one and something changed."""
        ...


def embedding_text(title: str, text: str) -> str:
    """The text the bi-encoder embeds for a document: "title. text" when the title is non-empty."""
    return f"{title}. {text}" if title and title.strip() else text

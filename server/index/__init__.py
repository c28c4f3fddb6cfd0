"""Stage 1: documents and their vectors behind one small protocol, and its embedded implementation.

    backend.py    IndexBackend (what the engine needs), Candidate(s), StoredDoc, Filter, Snapshotting
    filters.py    what a metadata filter means; the SQL pre-filter
    lexical.py    lexical (BM25) query analysis: user text -> a quoted FTS5 MATCH expression
    embedded.py   DocumentIndex: the usearch HNSW + SQLite implementation (concurrency, writes, search strategies)
    ann.py        the usearch graph with staged writes hidden, scores, exact search
    store.py      the SQLite document store, with its FTS5 lexical index kept in step by triggers
    snapshot.py   graph snapshots: write, check, load, reconcile with the store, rebuild
    layout.py     files of an index directory, its lock, the swap `index build` ends with
    durable.py    fsync and atomic-write helpers
    settings.py   IndexSettings (HNSW and filter knobs)

The names below are re-exported for convenience; code inside the project imports from the module that
defines them.
"""
from .backend import Candidate, Candidates, Filter, FilterValue, IndexBackend, Snapshotting, StoredDoc, embedding_text
from .embedded import DocumentIndex
from .filters import json_equal, metadata_matches
from .layout import (
                      BUILD_COMPLETE_FILE,
                      SNAPSHOT_META_FILE,
                      STORE_FILE,
                      DirectoryLock,
                      aside_dir,
                      recover_index_dir,
                      replace_index_dir,
                      staging_dir,
)
from .settings import IndexSettings

__all__ = [
    "BUILD_COMPLETE_FILE", "SNAPSHOT_META_FILE", "STORE_FILE", "Candidate", "Candidates", "DirectoryLock",
    "DocumentIndex", "Filter", "FilterValue", "IndexBackend", "IndexSettings", "Snapshotting", "StoredDoc",
    "aside_dir", "embedding_text", "json_equal", "metadata_matches", "recover_index_dir", "replace_index_dir",
    "staging_dir",
]

"""The SQLite document store of the embedded backend: the source of truth for documents and their vectors.

One table holds every document's caller id, text, title, metadata (JSON) and float32 vector under an integer
`key` that is also its key in the HNSW graph: keys are allocated monotonically and never reused (AUTOINCREMENT),
so a key names one vector for ever, which is what lets a snapshot of the graph be brought up to date by set
differences (snapshot.reconcile). A `meta` table records the format, dimension, metric and the change sequence
`seq`, bumped by every committed write.

The lexical index is an FTS5 table, `lexical`, over the documents' title and text (external content: it stores
terms, positions and lengths, not the text again). Triggers on `documents` keep it in step inside the very
transaction that writes the rows, so documents, vectors and terms commit, roll back and survive a crash
together. Store format 2 added it; a format-1 store is upgraded in place when opened writable (`_upgrade`).

Durability: WAL mode with synchronous=FULL, so a write is on disk once its COMMIT returns.
Connections: one writer (used under the index's writer mutex) and one read-only connection per reading thread.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from twostage.server.errors import FailedPrecondition

from .backend import StoredDoc
from .lexical import LEXICAL_TOKENIZER

log = logging.getLogger("twostage.index")

STORE_FORMAT = 2  # 1: documents and vectors; 2: + the FTS5 lexical index
SQL_CHUNK = 500  # keys or ids per "IN (...)" list
READ_CHUNK = 8192  # rows per chunk when streaming vectors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    key      INTEGER PRIMARY KEY AUTOINCREMENT,  -- the usearch key; monotonic, never reused
    id       TEXT NOT NULL UNIQUE,               -- the caller's id
    text     TEXT NOT NULL,
    title    TEXT NOT NULL,
    metadata TEXT NOT NULL,                      -- JSON object
    vector   BLOB NOT NULL                       -- float32, little-endian, `dimension` values
);
"""

# The lexical index (store format 2), one statement each: they run inside a transaction, which executescript
# would end. External content: FTS5 reads title and text from `documents` when it needs them; the triggers
# hand it each row's words as the row is written or removed (a 'delete' must be given the indexed values).
_LEXICAL_SCHEMA = (
    f"""CREATE VIRTUAL TABLE lexical USING fts5(title, text, content='documents', content_rowid='key',
        tokenize='{LEXICAL_TOKENIZER}')""",
    """CREATE TRIGGER documents_lexical_insert AFTER INSERT ON documents BEGIN
        INSERT INTO lexical(rowid, title, text) VALUES (new.key, new.title, new.text);
    END""",
    """CREATE TRIGGER documents_lexical_delete AFTER DELETE ON documents BEGIN
        INSERT INTO lexical(lexical, rowid, title, text) VALUES ('delete', old.key, old.title, old.text);
    END""",
    """CREATE TRIGGER documents_lexical_update AFTER UPDATE ON documents BEGIN
        INSERT INTO lexical(lexical, rowid, title, text) VALUES ('delete', old.key, old.title, old.text);
        INSERT INTO lexical(rowid, title, text) VALUES (new.key, new.title, new.text);
    END""",
)

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = SQL_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class DocumentStore:
    """documents.sqlite3: reads on per-thread connections, writes on `writer` inside a transaction the caller
    opens (BEGIN IMMEDIATE) and ends."""

    def __init__(self, path: Path, dimension: int, metric: str, *, writable: bool):
        """Open the store at `path`; `writable`: create it when empty and upgrade an older format in place
        (a read-only opener refuses both)."""
        self.path = path
        self.dimension = dimension
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.writer = self._connect()
        self.writer.execute("PRAGMA journal_mode=WAL")
        self.writer.execute("PRAGMA synchronous=FULL")
        self.writer.executescript(_SCHEMA)
        meta = dict(self.writer.execute("SELECT name, value FROM meta").fetchall())
        if not meta:
            if not writable:
                raise FailedPrecondition(f"{path} holds no index")
            with self.transaction():
                for statement in _LEXICAL_SCHEMA:
                    self.writer.execute(statement)
                self.writer.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", [
                    ("format", str(STORE_FORMAT)), ("dimension", str(dimension)),
                    ("metric", metric), ("seq", "0")])
            return
        stored_format = meta.get("format")
        if stored_format == "1":
            if not writable:
                raise FailedPrecondition(
                    f"index {path.parent} was built before the lexical index was added (store format 1) and is "
                    f"open read-only (index_view), so it cannot be upgraded; open it once without index_view "
                    f"(e.g. `twostage serve` without --index-view), which adds the lexical index in place and "
                    f"keeps every document, or rebuild it with `twostage index build --corpus ... "
                    f"--index {path.parent}`")
            self._upgrade()
        elif stored_format != str(STORE_FORMAT):
            raise FailedPrecondition(f"{path}: store format {stored_format} is not {STORE_FORMAT}")
        stored = (int(meta["dimension"]), meta["metric"])
        if stored != (dimension, metric):
            raise FailedPrecondition(
                f"index {path.parent} was built with dimension {stored[0]} and metric {stored[1]!r}, "
                f"but dimension {dimension} and metric {metric!r} were asked for (different bi-encoder "
                f"or index_metric); rebuild it with `twostage index build` or use another index directory")

    def _upgrade(self) -> None:
        """Store format 1 -> 2: create the lexical index and fill it from the stored documents, in one
        transaction (a crash leaves format 1, and the next writable open upgrades again)."""
        started = time.monotonic()
        with self.transaction():
            for statement in _LEXICAL_SCHEMA:
                self.writer.execute(statement)
            self.writer.execute("INSERT INTO lexical(lexical) VALUES ('rebuild')")
            self.writer.execute("UPDATE meta SET value = ? WHERE name = 'format'", (str(STORE_FORMAT),))
            count = self.writer.execute("SELECT count(*) FROM documents").fetchone()[0]
        log.warning("index %s: upgraded store format 1 -> %d: built the lexical index over %d documents in %.1f s",
                    self.path.parent, STORE_FORMAT, count, time.monotonic() - started)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self.writer.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.writer.execute("BEGIN IMMEDIATE")
        try:
            yield self.writer
        except BaseException:
            self.writer.execute("ROLLBACK")
            raise
        self.writer.execute("COMMIT")

    # -- reads
    def seq(self) -> int:
        return int(self.reader().execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0])

    def count(self) -> int:
        return int(self.reader().execute("SELECT count(*) FROM documents").fetchone()[0])

    def keys(self) -> np.ndarray:
        rows = self.reader().execute("SELECT key FROM documents").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))

    def vectors_of(self, keys: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) for those of `keys` that are stored."""
        found_keys: list[int] = []
        blobs: list[bytes] = []
        conn = self.reader()
        for chunk in chunks([int(k) for k in keys]):
            for key, blob in conn.execute(
                    f"SELECT key, vector FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk):
                found_keys.append(key)
                blobs.append(blob)
        return np.array(found_keys, dtype=np.uint64), self.matrix(blobs)

    def iter_vectors(self, chunk: int = READ_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) of every document, in chunks."""
        cur = self.reader().execute("SELECT key, vector FROM documents ORDER BY key")
        try:
            while rows := cur.fetchmany(chunk):
                yield np.array([r[0] for r in rows], dtype=np.uint64), self.matrix([r[1] for r in rows])
        finally:
            cur.close()  # ends the read transaction even when the caller stops early

    def matrix(self, blobs: list[bytes]) -> np.ndarray:
        """Vector blobs -> a (len(blobs), dimension) float32 array."""
        if not blobs:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dimension).astype(np.float32)

    def ids_of(self, keys: Iterable[int]) -> dict[int, str]:
        """key -> caller id for the stored `keys` (reads the id column only: it precedes the large ones)."""
        out: dict[int, str] = {}
        conn = self.reader()
        for chunk in chunks([int(k) for k in keys]):
            out.update(conn.execute(
                f"SELECT key, id FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk).fetchall())
        return out

    def rows_of(self, keys: Iterable[int], condition: str = "1",
                params: Sequence[object] = ()) -> dict[int, tuple[str, str]]:
        """key -> (id, metadata JSON) for the stored `keys` whose row satisfies `condition`."""
        out: dict[int, tuple[str, str]] = {}
        conn = self.reader()
        for chunk in chunks([int(k) for k in keys]):
            sql = (f"SELECT key, id, metadata FROM documents WHERE key IN ({_placeholders(len(chunk))}) "
                   f"AND {condition}")
            for key, doc_id, meta in conn.execute(sql, [*chunk, *params]):
                out[key] = (doc_id, meta)
        return out

    def scan(self, condition: str, params: Sequence[object],
             chunk: int = READ_CHUNK) -> Iterator[list[tuple[int, str, str, bytes]]]:
        """Chunks of (key, id, metadata JSON, vector blob) for rows satisfying `condition`."""
        cur = self.reader().execute(
            f"SELECT key, id, metadata, vector FROM documents WHERE {condition}", list(params))
        try:
            while rows := cur.fetchmany(chunk):
                yield rows
        finally:
            cur.close()

    def lexical_top(self, match: str, k: int) -> list[tuple[str, float]]:
        """(id, score) of the k documents that score best by BM25 for the FTS5 expression `match`, best first;
        score = -bm25() (FTS5's bm25() is negative, lower is better), ties broken by key. One statement, so
        one read snapshot: every id returned has its row in that snapshot."""
        return self.reader().execute(
            "SELECT d.id, r.score FROM (SELECT rowid AS key, -bm25(lexical) AS score FROM lexical "
            "WHERE lexical MATCH ? ORDER BY bm25(lexical), rowid LIMIT ?) AS r "
            "JOIN documents AS d ON d.key = r.key ORDER BY r.score DESC, r.key", (match, k)).fetchall()

    def lexical_scan(self, match: str, condition: str, params: Sequence[object],
                     chunk: int = SQL_CHUNK) -> Generator[list[tuple[str, str, float]], None, None]:
        """Chunks of (id, metadata JSON, score) of every document that matches `match` and whose row satisfies
        `condition`, best BM25 score first (as `lexical_top`); stop early by closing the iterator."""
        cur = self.reader().execute(
            "SELECT d.id, d.metadata, -bm25(lexical) FROM lexical JOIN documents AS d ON d.key = lexical.rowid "
            f"WHERE lexical MATCH ? AND ({condition}) ORDER BY bm25(lexical), d.key", [match, *params])
        try:
            while rows := cur.fetchmany(chunk):
                yield rows
        finally:
            cur.close()

    def lexical_in_step(self) -> bool:
        """Whether the lexical index holds exactly the words of the stored titles and texts (FTS5's
        integrity check against its content table; reads everything). Runs on `writer` (the check is spelled as
        an INSERT, which the read-only connections refuse); the caller keeps other writers out."""
        try:
            self.writer.execute("INSERT INTO lexical(lexical, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError:
            return False
        return True

    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        out: dict[str, StoredDoc] = {}
        conn = self.reader()
        for chunk in chunks(list(ids)):
            for doc_id, text, title, meta in conn.execute(
                    f"SELECT id, text, title, metadata FROM documents WHERE id IN ({_placeholders(len(chunk))})",
                    list(chunk)):
                out[doc_id] = StoredDoc(doc_id, text, title, json.loads(meta))
        return out

    def existing(self, ids: Sequence[str], conn: sqlite3.Connection | None = None) -> dict[str, int]:
        """id -> key for those of `ids` that are stored."""
        out: dict[str, int] = {}
        conn = conn or self.reader()
        for chunk in chunks(list(ids)):
            out.update(conn.execute(
                f"SELECT id, key FROM documents WHERE id IN ({_placeholders(len(chunk))})", list(chunk)).fetchall())
        return out

    # -- writes (on `writer`, inside a transaction the caller opened)
    def insert(self, docs: Sequence[StoredDoc], vectors: np.ndarray) -> list[int]:
        """Add `docs` with their vectors; returns the new keys in order."""
        keys = []
        for doc, vector in zip(docs, vectors, strict=True):
            metadata = json.dumps(doc.metadata, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            cur = self.writer.execute(
                "INSERT INTO documents(id, text, title, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                (doc.id, doc.text, doc.title, metadata, vector.astype("<f4").tobytes()))
            assert cur.lastrowid is not None
            keys.append(cur.lastrowid)
        return keys

    def remove(self, keys: Sequence[int]) -> None:
        for chunk in chunks(list(keys)):
            self.writer.execute(f"DELETE FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk)

    def bump_seq(self) -> int:
        """Advance the change sequence; returns the new value."""
        self.writer.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'seq'")
        return int(self.writer.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0])

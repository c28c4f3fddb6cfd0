"""The vector index (usearch HNSW) and the document store (SQLite) behind Search, Upsert and Delete.

Files in an index directory:

    documents.sqlite3 (+ -wal, -shm)  the source of truth: every document's id, text, title, metadata
                                      (JSON) and float32 vector, keyed by a 64-bit integer `key`
    hnsw-<seq>.usearch                a snapshot of the HNSW graph as of change sequence <seq>
    snapshot.json                     names the current snapshot file, its size, sha256 and sequence
    LOCK                              flock()ed while a process has the index open

Durability. SQLite runs in WAL mode with synchronous=FULL; an Upsert or Delete is acknowledged only after
its transaction has committed, and every committed transaction bumps the change sequence `seq` (meta
table). The HNSW graph lives in memory and is written as a snapshot now and then (`save`,
`maybe_save`, `close`): to a temporary file, fsync, rename, then `snapshot.json` is replaced the same
way, so a crash at any moment leaves the previous complete snapshot in force. On open the snapshot is
checked (size, sha256, settings, not ahead of the store) and loaded, then brought up to date with the
store: keys are allocated monotonically and never reused, so a key present in both holds the same
vector, and replaying the writes after the snapshot amounts to adding the store keys the snapshot
lacks and removing the keys the store no longer has. A missing, corrupt or stale-beyond-repair
snapshot (or different HNSW settings) makes the graph be rebuilt from the stored vectors. After open
the index keys and the store keys are the same set.

Concurrency. One writer at a time (a mutex). A write first adds its new vectors to the graph in small
chunks while searches go on; those keys are "pending" and every search skips them (it asks usearch
for that many more results). Then, under the write side of a readers-writer lock, the SQLite
transaction commits, the replaced or deleted keys are removed and the pending keys become visible;
searches hold the read side, so a search sees the whole of a write or none of it, and is held up only
for the commit (one fsync) and the removals. usearch calls themselves are serialized (the Python
binding shares one per-thread search context between callers); snapshots are written while searches
go on (writers wait).

Scores. `Hit.score` is a similarity, higher is closer: for `cos` it is the cosine (1 - usearch
distance); for `ip` the inner product (usearch reports 1 - dot, so again 1 - distance); for `l2sq` it is
minus the squared Euclidean distance.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
# onnxruntime must be loaded before usearch: with usearch 2.26 + onnxruntime 1.32, `import usearch.index`
# followed by `import onnxruntime` crashes the process (segfault in libstdc++'s codecvt during onnxruntime's
# static initialisation). Importing onnxruntime first is safe; tests/test_contract.py guards the order.
import onnxruntime  # noqa: F401,E402  isort: skip
from usearch.index import Index  # noqa: E402

from .errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("twostage.index")

STORE_FILE = "documents.sqlite3"
SNAPSHOT_META_FILE = "snapshot.json"
LOCK_FILE = "LOCK"
SNAPSHOT_PREFIX = "hnsw-"
SNAPSHOT_SUFFIX = ".usearch"
STORE_FORMAT = 1
# Directory names used by `index build` (see replace_index_dir / recover_index_dir).
STAGING_SUFFIX = ".tmp-build"
ASIDE_SUFFIX = ".old-build"
BUILD_COMPLETE_FILE = "build-complete.json"

METRICS = ("cos", "ip", "l2sq")
DTYPES = ("f32", "f16", "i8")
# A filtered search switches from widening HNSW rounds to scanning the matching documents when the
# candidates it expects to need exceed this fraction of the index.
SCAN_FRACTION = 0.125
_SQL_CHUNK = 500  # keys or ids per "IN (...)" list
_ADD_CHUNK = 32  # vectors added to the graph per usearch call during a write (searches interleave)
_READ_CHUNK = 8192  # rows per chunk when streaming vectors


# ---------------------------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSettings:
    """How the HNSW graph is built and searched (the metric also fixes what scores mean)."""

    metric: str = "cos"
    dtype: str = "f32"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 128
    view: bool = False
    filter_overfetch: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.metric not in METRICS:
            problems.append(f"metric {self.metric!r} not one of {METRICS}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not one of {DTYPES}")
        for name in ("connectivity", "expansion_add", "expansion_search", "filter_overfetch"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if problems:
            raise ValueError("invalid index settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Any) -> "IndexSettings":
        """Read the index_* knobs (and filter_overfetch) of a `Config`."""
        return cls(
            metric=config.index_metric,
            dtype=config.index_dtype,
            connectivity=int(config.index_connectivity),
            expansion_add=int(config.index_expansion_add),
            expansion_search=int(config.index_expansion_search),
            view=bool(config.index_view),
            filter_overfetch=int(config.filter_overfetch),
        )


@dataclass
class StoredDoc:
    """A document as stored (the vector is kept beside it, not in this object)."""

    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result: `score` is a similarity (higher is closer), `rank` its 0-based position."""

    id: str
    key: int
    score: float
    rank: int


@dataclass
class SearchResult:
    """Hits best first. `exhausted`: a filter left fewer than k matching documents in the whole index.
    `strategy`: "ann" (HNSW), "ann-all" (HNSW over every document), "scan" (exact over the documents
    matching the filter) or "empty"."""

    hits: list[Hit]
    exhausted: bool = False
    strategy: str = "ann"


def embedding_text(title: str, text: str) -> str:
    """The text the bi-encoder embeds for a document: "title. text" when the title is non-empty."""
    return f"{title}. {text}" if title and title.strip() else text


# ---------------------------------------------------------------------------------------------
# Metadata filter
# ---------------------------------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers compare by value (3 == 3.0), booleans only equal booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return False


def metadata_matches(metadata: dict, filter: dict) -> bool:
    """True when every key of `filter` is in `metadata` with an equal JSON value."""
    return all(key in metadata and json_equal(metadata[key], value) for key, value in filter.items())


def _check_filter(filter: Any) -> dict:
    if not isinstance(filter, dict):
        raise InvalidArgument("filter", f"must be a JSON object, got {type(filter).__name__}")
    for key, value in filter.items():
        if not isinstance(key, str):
            raise InvalidArgument("filter", f"keys must be strings, got {key!r}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"filter.{key}", f"not a JSON value ({exc})") from None
    return filter


def _json_path(key: str) -> str | None:
    """SQLite JSON path of a top-level key, or None when the key cannot be quoted safely."""
    if any(c in key for c in '"\\') or any(ord(c) < 32 for c in key):
        return None
    return f'$."{key}"'


def _filter_sql(filter: dict) -> tuple[str, list]:
    """A SQL condition on `metadata` that every matching row satisfies (a pre-filter: rows that pass
    are checked again with `metadata_matches`, which is the definition)."""
    clauses: list[str] = []
    params: list = []
    for key, value in filter.items():
        path = _json_path(key)
        if path is None:
            continue
        if value is None:
            clauses.append("json_type(metadata, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            clauses.append(f"json_type(metadata, ?) = '{'true' if value else 'false'}'")
            params.append(path)
        elif isinstance(value, (int, float)):
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                continue  # beyond SQLite integers: left to metadata_matches
            clauses.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        elif isinstance(value, str):
            clauses.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        elif isinstance(value, (list, tuple)):
            clauses.append("json_type(metadata, ?) = 'array'")
            params.append(path)
        elif isinstance(value, dict):
            clauses.append("json_type(metadata, ?) = 'object'")
            params.append(path)
    return (" AND ".join(f"({c})" for c in clauses) or "1"), params


# ---------------------------------------------------------------------------------------------
# Small helpers: locks and files
# ---------------------------------------------------------------------------------------------


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class DirectoryLock:
    """flock() on <dir>/LOCK: exclusive for read-write use, shared for read-only views. The kernel
    drops it when the process dies, so a crash never leaves a stale lock."""

    def __init__(self, directory: Path, exclusive: bool):
        self.path = directory / LOCK_FILE
        self._file = open(self.path, "a+")
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._file.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise FailedPrecondition(
                f"index directory {directory} is in use by another process (a server or an index build "
                f"holds {self.path}); stop that process first") from None
        self.exclusive = exclusive

    def try_upgrade(self) -> bool:
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def downgrade(self) -> None:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_SH)

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


# ---------------------------------------------------------------------------------------------
# Directory swap used by `index build` (here because the index owns its directory layout)
# ---------------------------------------------------------------------------------------------


def staging_dir(index_dir: Path) -> Path:
    return index_dir.with_name(index_dir.name + STAGING_SUFFIX)


def aside_dir(index_dir: Path) -> Path:
    return index_dir.with_name(index_dir.name + ASIDE_SUFFIX)


def replace_index_dir(new_dir: Path, index_dir: Path) -> None:
    """Put the finished build `new_dir` (which must hold BUILD_COMPLETE_FILE) in place of `index_dir`.

    Steps and what a crash after each leaves (recover_index_dir, run by DocumentIndex.open and by
    the next build, finishes or undoes it):
      1. rename index_dir -> <index_dir>.old-build   crash: index_dir missing, the build complete in
                                                      staging -> recovery renames staging in (step 2)
      2. rename new_dir -> index_dir                 crash: new index in place, old one aside ->
                                                      recovery deletes the aside copy (step 3)
      3. delete <index_dir>.old-build
    Each rename is atomic and followed by an fsync of the parent directory.
    """
    if not (new_dir / BUILD_COMPLETE_FILE).is_file():
        raise FailedPrecondition(f"{new_dir} is not a finished build (no {BUILD_COMPLETE_FILE})")
    parent = index_dir.parent
    aside = aside_dir(index_dir)
    if aside.exists():
        shutil.rmtree(aside)
    lock = DirectoryLock(index_dir, exclusive=True) if index_dir.is_dir() else None
    try:
        if index_dir.exists():
            os.rename(index_dir, aside)
            _fsync_dir(parent)
        os.rename(new_dir, index_dir)
        _fsync_dir(parent)
    finally:
        if lock is not None:
            lock.release()
    if aside.exists():
        shutil.rmtree(aside)


def recover_index_dir(index_dir: Path) -> str | None:
    """Finish or undo a directory swap that a crash interrupted; returns what it did, or None."""
    aside = aside_dir(index_dir)
    if not aside.exists():
        return None
    if index_dir.exists():
        shutil.rmtree(aside)
        return f"removed {aside} left over from a finished index swap"
    staging = staging_dir(index_dir)
    if (staging / BUILD_COMPLETE_FILE).is_file():
        os.rename(staging, index_dir)
        _fsync_dir(index_dir.parent)
        shutil.rmtree(aside)
        return f"finished an interrupted index swap: moved {staging} to {index_dir}"
    os.rename(aside, index_dir)
    _fsync_dir(index_dir.parent)
    return f"undid an interrupted index swap: moved {aside} back to {index_dir}"


# ---------------------------------------------------------------------------------------------
# SQLite document store
# ---------------------------------------------------------------------------------------------

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


def _chunks(items: Sequence, size: int = _SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class _Store:
    """The SQLite side: one writer connection (used under the index's writer mutex) and one
    read-only connection per reading thread."""

    def __init__(self, path: Path, dimension: int, metric: str, *, create: bool):
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
            if not create:
                raise FailedPrecondition(f"{path} holds no index")
            with self.transaction():
                self.writer.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", [
                    ("format", str(STORE_FORMAT)), ("dimension", str(dimension)),
                    ("metric", metric), ("seq", "0")])
            return
        if int(meta.get("format", -1)) != STORE_FORMAT:
            raise FailedPrecondition(f"{path}: store format {meta.get('format')} is not {STORE_FORMAT}")
        stored = (int(meta["dimension"]), meta["metric"])
        if stored != (dimension, metric):
            raise FailedPrecondition(
                f"index {path.parent} was built with dimension {stored[0]} and metric {stored[1]!r}, "
                f"but dimension {dimension} and metric {metric!r} were asked for (different bi-encoder "
                f"or index_metric); rebuild it with `twostage index build` or use another index directory")

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

    def vectors_of(self, keys: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) for those of `keys` that are stored."""
        found_keys: list[int] = []
        blobs: list[bytes] = []
        conn = self.reader()
        for chunk in _chunks([int(k) for k in keys]):
            for key, blob in conn.execute(
                    f"SELECT key, vector FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk):
                found_keys.append(key)
                blobs.append(blob)
        return np.array(found_keys, dtype=np.uint64), self._matrix(blobs)

    def iter_vectors(self, chunk: int = _READ_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cur = self.reader().execute("SELECT key, vector FROM documents ORDER BY key")
        try:
            while rows := cur.fetchmany(chunk):
                yield np.array([r[0] for r in rows], dtype=np.uint64), self._matrix([r[1] for r in rows])
        finally:
            cur.close()  # ends the read transaction even when the caller stops early

    def _matrix(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dimension).astype(np.float32)

    def rows_of(self, keys: Sequence[int], condition: str = "1", params: Sequence = ()) -> dict[int, tuple[str, str]]:
        """key -> (id, metadata JSON) for the stored `keys` whose row satisfies `condition`."""
        out: dict[int, tuple[str, str]] = {}
        conn = self.reader()
        for chunk in _chunks([int(k) for k in keys]):
            sql = (f"SELECT key, id, metadata FROM documents WHERE key IN ({_placeholders(len(chunk))}) "
                   f"AND {condition}")
            for key, doc_id, meta in conn.execute(sql, [*chunk, *params]):
                out[key] = (doc_id, meta)
        return out

    def scan(self, condition: str, params: Sequence, chunk: int = _READ_CHUNK) -> Iterator[list[tuple]]:
        """Chunks of (key, id, metadata JSON, vector blob) for rows satisfying `condition`."""
        cur = self.reader().execute(
            f"SELECT key, id, metadata, vector FROM documents WHERE {condition}", list(params))
        try:
            while rows := cur.fetchmany(chunk):
                yield rows
        finally:
            cur.close()

    def get(self, ids: Sequence[str]) -> dict[str, StoredDoc]:
        out: dict[str, StoredDoc] = {}
        conn = self.reader()
        for chunk in _chunks(list(ids)):
            for doc_id, text, title, meta in conn.execute(
                    f"SELECT id, text, title, metadata FROM documents WHERE id IN ({_placeholders(len(chunk))})",
                    list(chunk)):
                out[doc_id] = StoredDoc(doc_id, text, title, json.loads(meta))
        return out

    def existing(self, ids: Sequence[str], conn: sqlite3.Connection | None = None) -> dict[str, int]:
        """id -> key for those of `ids` that are stored."""
        out: dict[str, int] = {}
        conn = conn or self.reader()
        for chunk in _chunks(list(ids)):
            out.update(conn.execute(
                f"SELECT id, key FROM documents WHERE id IN ({_placeholders(len(chunk))})", list(chunk)).fetchall())
        return out

    # -- writes (inside `transaction`)
    def bump_seq(self, conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'seq'")
        return int(conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0])


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


class DocumentIndex:
    """HNSW graph + SQLite document store kept in step. Open with `DocumentIndex.open`."""

    def __init__(self, path: Path, dimension: int, settings: IndexSettings, store: _Store,
                 lock: DirectoryLock):
        self.path = path
        self._dimension = dimension
        self._settings = settings
        self._store = store
        self._lock = lock
        self._hnsw: Index | None = None
        self._rw = _RWLock()
        self._write_mutex = threading.Lock()  # one writer (or snapshot) at a time
        self._ann_mutex = threading.Lock()  # usearch calls, one at a time
        self._pending: set[int] = set()  # keys in the graph whose write has not committed yet
        self._count = 0  # committed documents (the graph may also hold pending keys)
        self._seq = 0  # store sequence the in-memory graph reflects
        self._snapshot_seq = -1  # sequence of the snapshot on disk (-1: none valid)
        self._last_save = time.monotonic()
        self._failed: str | None = None
        self._closed = False
        self.opened_from = "new"  # how the graph was obtained at open (for logs and tests)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path | str, dimension: int, settings: IndexSettings) -> "DocumentIndex":
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
            store = _Store(path / STORE_FILE, dimension, settings.metric, create=not settings.view)
        except BaseException:
            lock.release()
            raise
        index = cls(path, dimension, settings, store, lock)
        try:
            index._load()
        except BaseException:
            store.close()
            lock.release()
            raise
        return index

    def _new_hnsw(self) -> Index:
        s = self._settings
        return Index(ndim=self._dimension, metric=s.metric, dtype=s.dtype, connectivity=s.connectivity,
                     expansion_add=s.expansion_add, expansion_search=s.expansion_search)

    def _load(self) -> None:
        store_seq = self._store.seq()
        snapshot, reason = self._read_snapshot(store_seq, view=self._settings.view)
        if self._settings.view:
            if snapshot is not None and self._in_step(snapshot):
                self._adopt(snapshot, store_seq, snapshot_seq=store_seq, how="snapshot (view)")
                return
            # Bring the snapshot up to date (needs the directory to ourselves for a moment), then map it.
            if not self._lock.try_upgrade():
                raise FailedPrecondition(
                    f"the snapshot in {self.path} is behind its document store ({reason or 'keys differ'}) and "
                    f"another process has the index open; open it read-write once to write a current snapshot")
            try:
                if snapshot is not None:
                    snapshot.reset()
                self._load_writable(store_seq)
                if self._snapshot_seq != self._seq:
                    self._save_snapshot()
            finally:
                self._lock.downgrade()
            self._hnsw.reset()
            self._hnsw = None
            snapshot, reason = self._read_snapshot(store_seq, view=True)
            if snapshot is None:
                raise FailedPrecondition(f"could not map the snapshot just written in {self.path}: {reason}")
            self._adopt(snapshot, store_seq, snapshot_seq=store_seq, how="snapshot (view, refreshed)")
            return
        self._load_writable(store_seq, snapshot, reason)
        self._check_in_step()

    def _load_writable(self, store_seq: int, snapshot: Index | None = None, reason: str | None = None) -> None:
        if snapshot is None and reason is None:
            snapshot, reason = self._read_snapshot(store_seq, view=False)
        if snapshot is None:
            self._rebuild(store_seq, reason or "no snapshot")
            return
        snapshot_seq = self._snapshot_meta_seq()
        added, removed = self._reconcile(snapshot)
        how = "snapshot" if not (added or removed) else f"snapshot + replay (+{added} -{removed})"
        if added or removed:
            snapshot_seq = -1  # the graph in memory is newer than the file
        self._adopt(snapshot, store_seq, snapshot_seq=snapshot_seq, how=how)
        log.info("index %s: opened from %s, %d documents", self.path, how, len(snapshot))

    def _adopt(self, hnsw: Index, seq: int, snapshot_seq: int, how: str) -> None:
        hnsw.expansion_search = self._settings.expansion_search
        if not self._settings.view:
            hnsw.expansion_add = self._settings.expansion_add
        self._hnsw = hnsw
        self._count = len(hnsw)
        self._seq = seq
        self._snapshot_seq = snapshot_seq
        self.opened_from = how

    def _rebuild(self, store_seq: int, reason: str) -> None:
        hnsw = self._new_hnsw()
        if store_seq == 0 and reason == "no snapshot":  # a new, empty index
            self._adopt(hnsw, store_seq, snapshot_seq=-1, how="new")
            return
        log.warning("index %s: rebuilding the HNSW graph from the document store (%s)", self.path, reason)
        for keys, vectors in self._store.iter_vectors():
            hnsw.add(keys, vectors, threads=0)
        self._adopt(hnsw, store_seq, snapshot_seq=-1, how=f"rebuild ({reason})")
        if len(hnsw):
            self._save_snapshot()

    def _snapshot_meta(self) -> dict | None:
        try:
            meta = json.loads((self.path / SNAPSHOT_META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _snapshot_meta_seq(self) -> int:
        meta = self._snapshot_meta()
        return int(meta["seq"]) if meta else -1

    def _read_snapshot(self, store_seq: int, *, view: bool) -> tuple[Index | None, str | None]:
        """Load (or map) the current snapshot if it is whole and fits; else (None, why not)."""
        meta = self._snapshot_meta()
        if meta is None:
            return None, "no snapshot" if not (self.path / SNAPSHOT_META_FILE).exists() else "unreadable snapshot.json"
        s = self._settings
        try:
            file = self.path / str(meta["file"])
            expected = {"dimension": self._dimension, "metric": s.metric, "dtype": s.dtype,
                        "connectivity": s.connectivity}
            for name, want in expected.items():
                if meta[name] != want:
                    return None, f"snapshot {name} {meta[name]!r} differs from {want!r}"
            if int(meta["seq"]) > store_seq:
                return None, f"snapshot sequence {meta['seq']} is ahead of the store ({store_seq})"
            if Path(meta["file"]).name != meta["file"] or not file.is_file():
                return None, f"snapshot file {meta['file']!r} missing"
            if file.stat().st_size != int(meta["bytes"]):
                return None, f"snapshot file {file.name} has {file.stat().st_size} bytes, expected {meta['bytes']}"
            if _sha256_file(file) != meta["sha256"]:
                return None, f"snapshot file {file.name} fails its sha256 check"
            hnsw = Index.restore(file, view=view, connectivity=s.connectivity,
                                 expansion_add=s.expansion_add, expansion_search=s.expansion_search)
        except Exception as exc:  # noqa: BLE001 - any failure to read it means: rebuild
            return None, f"snapshot unusable ({type(exc).__name__}: {exc})"
        if hnsw is None or hnsw.ndim != self._dimension or len(hnsw) != int(meta["count"]):
            return None, "snapshot header does not match snapshot.json"
        return hnsw, None

    def _hnsw_keys(self, hnsw: Index) -> np.ndarray:
        if len(hnsw) == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.asarray(hnsw._compiled.get_keys_in_slice(), dtype=np.uint64)

    def _in_step(self, hnsw: Index) -> bool:
        keys = self._hnsw_keys(hnsw)
        store = self._store.keys()
        return len(keys) == len(store) and np.array_equal(np.sort(keys), np.sort(store))

    def _reconcile(self, hnsw: Index) -> tuple[int, int]:
        """Replay the store's writes after the snapshot: add missing keys, remove deleted ones."""
        index_keys = self._hnsw_keys(hnsw)
        store_keys = self._store.keys()
        extra = np.setdiff1d(index_keys, store_keys, assume_unique=True)
        missing = np.setdiff1d(store_keys, index_keys, assume_unique=True)
        if len(extra):
            hnsw.remove(extra)
        for chunk in _chunks(missing, _READ_CHUNK):
            keys, vectors = self._store.vectors_of(chunk)
            if len(keys):
                hnsw.add(keys, vectors, threads=0)
        return len(missing), len(extra)

    def _check_in_step(self) -> None:
        if not self._in_step(self._hnsw):
            raise FailedPrecondition(f"index {self.path}: HNSW keys and document store keys differ after open")

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

    def verify(self) -> int:
        """Check that the HNSW keys and the store keys are the same set; returns the document count."""
        with self._write_mutex, self._rw.read():
            with self._ann_mutex:
                same = self._in_step(self._hnsw) and len(self._hnsw) == self._count
            if not same:
                raise FailedPrecondition(f"index {self.path}: HNSW keys and document store keys differ")
            return self.size

    # ------------------------------------------------------------------ search
    def _query(self, vector: Any, name: str = "vector") -> np.ndarray:
        q = np.asarray(vector, dtype=np.float32)
        if q.ndim != 1 or q.shape[0] != self._dimension:
            raise InvalidArgument(name, f"has shape {tuple(q.shape)}; the index dimension is {self._dimension}")
        if not np.all(np.isfinite(q)):
            raise InvalidArgument(name, "contains NaN or infinity")
        return np.ascontiguousarray(q)

    def _scores(self, distances: np.ndarray) -> np.ndarray:
        d = np.asarray(distances, dtype=np.float64)
        return -d if self._settings.metric == "l2sq" else 1.0 - d

    def _exact_scores(self, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Similarity of `query` (d,) or (q, d) to each row of `vectors`, as `Hit.score` defines it."""
        q = np.atleast_2d(query).astype(np.float32)
        if self._settings.metric == "ip":
            return q @ vectors.T
        if self._settings.metric == "cos":
            qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
            vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
            return qn @ vn.T
        sq = (q * q).sum(axis=1, keepdims=True) + (vectors * vectors).sum(axis=1)[None, :] - 2.0 * (q @ vectors.T)
        return -np.maximum(sq, 0.0)

    def _ann(self, queries: np.ndarray, count: int, expansion: int | None,
             threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """usearch search, skipping pending keys: (keys, distances) per query, best first (the
        caller holds the read lock). When the graph holds no more vectors than the search would visit
        (expansion_search), usearch compares against all of them instead: as cheap, and exact (after many
        replacements an HNSW graph can leave a node unreachable)."""
        queries = queries.reshape(-1, self._dimension)
        with self._ann_mutex:
            hnsw = self._hnsw
            pending = np.fromiter(self._pending, dtype=np.uint64, count=len(self._pending))
            default = hnsw.expansion_search
            if expansion and expansion != default:
                hnsw.expansion_search = int(expansion)
            try:
                found = hnsw.search(queries, count + len(pending), threads=threads,
                                    exact=len(hnsw) <= hnsw.expansion_search)
            finally:
                if expansion and expansion != default:
                    hnsw.expansion_search = default
        rows = [found] if len(queries) == 1 else [found[i] for i in range(len(queries))]
        out = []
        for m in rows:
            keys, distances = np.asarray(m.keys, dtype=np.uint64), np.asarray(m.distances)
            if len(pending):
                visible = ~np.isin(keys, pending)
                keys, distances = keys[visible], distances[visible]
            out.append((keys[:count], distances[:count]))
        return out

    def _check_k(self, k: int) -> int:
        if int(k) <= 0:
            raise InvalidArgument("top_k", f"must be > 0 (got {k})")
        return int(k)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"index {self.path} is closed")

    def search(self, vector: Any, k: int, *, expansion_search: int | None = None,
               filter: dict | None = None) -> SearchResult:
        """The k nearest documents to `vector` (matching `filter`, when given, on metadata)."""
        self._check_open()
        q = self._query(vector)
        k = self._check_k(k)
        if expansion_search is not None and expansion_search < 0:
            raise InvalidArgument("expansion_search", f"must be >= 0 (got {expansion_search})")
        flt = _check_filter(filter) if filter else None
        with self._rw.read():
            n = self.size
            if n == 0:
                return SearchResult([], exhausted=bool(flt), strategy="empty")
            if not flt:
                keys, distances = self._ann(q, min(k, n), expansion_search)[0]
                rows = self._store.rows_of(keys)
                return SearchResult(self._hits(keys, distances, rows), strategy="ann")
            return self._filtered_search(q, k, n, expansion_search, flt)

    def _hits(self, keys: np.ndarray, distances: np.ndarray, rows: dict[int, tuple[str, str]],
              limit: int | None = None) -> list[Hit]:
        hits: list[Hit] = []
        for key, score in zip(keys.tolist(), self._scores(distances).tolist()):
            if key in rows:
                hits.append(Hit(rows[key][0], key, score, len(hits)))
                if limit is not None and len(hits) == limit:
                    break
        return hits

    def _filtered_search(self, q: np.ndarray, k: int, n: int, expansion: int | None, flt: dict) -> SearchResult:
        condition, params = _filter_sql(flt)
        fetch = min(n, k * self._settings.filter_overfetch)
        while True:
            keys, distances = self._ann(q, fetch, expansion)[0]
            rows = self._store.rows_of(keys, condition, params)
            rows = {key: row for key, row in rows.items() if metadata_matches(json.loads(row[1]), flt)}
            if len(rows) >= k:
                return SearchResult(self._hits(keys, distances, rows, limit=k), strategy="ann")
            if fetch >= n:
                if len(keys) >= n:  # the graph gave back every document: the matches are all there are
                    return SearchResult(self._hits(keys, distances, rows), exhausted=True, strategy="ann-all")
                break
            selectivity = len(rows) / max(len(keys), 1)
            needed = k / selectivity if selectivity else math.inf
            if needed > n * SCAN_FRACTION:
                break
            fetch = min(n, max(2 * fetch, math.ceil(needed * 1.25)))
        return self._scan_search(q, k, flt, condition, params)

    def _scan_search(self, q: np.ndarray, k: int, flt: dict, condition: str, params: list) -> SearchResult:
        """Exact search over the documents matching the filter (for selective filters)."""
        best_keys = np.zeros(0, dtype=np.int64)
        best_scores = np.zeros(0, dtype=np.float64)
        ids: dict[int, str] = {}
        matched = 0
        for rows in self._store.scan(condition, params):
            rows = [r for r in rows if metadata_matches(json.loads(r[2]), flt)]
            if not rows:
                continue
            matched += len(rows)
            keys = np.array([r[0] for r in rows], dtype=np.int64)
            scores = self._exact_scores(q, self._store._matrix([r[3] for r in rows]))[0].astype(np.float64)
            for r in rows:
                ids[r[0]] = r[1]
            best_keys = np.concatenate([best_keys, keys])
            best_scores = np.concatenate([best_scores, scores])
            if len(best_keys) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_keys, best_scores = best_keys[keep], best_scores[keep]
                ids = {int(key): ids[int(key)] for key in best_keys}
        order = np.argsort(-best_scores, kind="stable")
        hits = [Hit(ids[int(best_keys[i])], int(best_keys[i]), float(best_scores[i]), rank)
                for rank, i in enumerate(order[:k])]
        return SearchResult(hits, exhausted=matched < k, strategy="scan")

    def search_batch(self, vectors: Any, k: int, *, expansion_search: int | None = None) -> list[SearchResult]:
        """Unfiltered search for many queries at once (all cores; for benchmarks and evaluation)."""
        self._check_open()
        qs = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if qs.ndim != 2 or qs.shape[1] != self._dimension:
            raise InvalidArgument("vectors", f"has shape {tuple(qs.shape)}; expected (n, {self._dimension})")
        k = self._check_k(k)
        with self._rw.read():
            n = self.size
            if n == 0:
                return [SearchResult([], strategy="empty") for _ in range(len(qs))]
            results = []
            for keys, distances in self._ann(qs, min(k, n), expansion_search, threads=0):
                results.append(SearchResult(self._hits(keys, distances, self._store.rows_of(keys))))
            return results

    def exact_search(self, vector: Any, k: int) -> SearchResult:
        """Brute-force search over the stored float32 vectors (ground truth for recall)."""
        return self.exact_search_batch(self._query(vector)[None, :], k)[0]

    def exact_search_batch(self, vectors: Any, k: int) -> list[SearchResult]:
        """Brute-force search for many queries, streaming the stored vectors once."""
        self._check_open()
        qs = np.asarray(vectors, dtype=np.float32)
        if qs.ndim != 2 or qs.shape[1] != self._dimension:
            raise InvalidArgument("vectors", f"has shape {tuple(qs.shape)}; expected (n, {self._dimension})")
        k = self._check_k(k)
        with self._rw.read():
            best_keys = np.zeros((len(qs), 0), dtype=np.int64)
            best_scores = np.zeros((len(qs), 0), dtype=np.float64)
            for keys, vectors_chunk in self._store.iter_vectors():
                scores = self._exact_scores(qs, vectors_chunk).astype(np.float64)
                best_keys = np.concatenate([best_keys, np.broadcast_to(keys.astype(np.int64), scores.shape)], axis=1)
                best_scores = np.concatenate([best_scores, scores], axis=1)
                if best_keys.shape[1] > k:
                    keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                    best_keys = np.take_along_axis(best_keys, keep, axis=1)
                    best_scores = np.take_along_axis(best_scores, keep, axis=1)
            order = np.argsort(-best_scores, axis=1, kind="stable")
            best_keys = np.take_along_axis(best_keys, order, axis=1)
            best_scores = np.take_along_axis(best_scores, order, axis=1)
            rows = self._store.rows_of(np.unique(best_keys))
        return [SearchResult([Hit(rows[int(key)][0], int(key), float(score), rank)
                              for rank, (key, score) in enumerate(zip(best_keys[i], best_scores[i]))],
                             strategy="exact")
                for i in range(len(qs))]

    # ------------------------------------------------------------------ reads
    def get(self, ids: Iterable[str]) -> dict[str, StoredDoc]:
        """Stored documents by id (ids not stored are absent from the result)."""
        self._check_open()
        return self._store.get(list(dict.fromkeys(ids)))

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Those of `ids` that are stored."""
        self._check_open()
        return set(self._store.existing(list(dict.fromkeys(ids))))

    # ------------------------------------------------------------------ writes
    def _check_writable(self) -> None:
        self._check_open()
        if self._settings.view:
            raise FailedPrecondition(
                f"index {self.path} is open read-only (index_view); Upsert and Delete are refused")
        if self._failed:
            raise FailedPrecondition(f"index {self.path} is out of step with its store ({self._failed}); "
                                     f"restart the server to recover")

    def _check_documents(self, docs: Sequence[StoredDoc], vectors: Any) -> tuple[np.ndarray, list[str]]:
        if not docs:
            raise InvalidArgument("documents", "at least one document is required")
        first_at: dict[str, int] = {}
        for i, doc in enumerate(docs):
            if not isinstance(doc.id, str) or not doc.id:
                raise InvalidArgument(f"documents[{i}].id", "must be a non-empty string")
            if doc.id in first_at:
                raise InvalidArgument("documents", f"duplicate id {doc.id!r} at positions {first_at[doc.id]} and {i}")
            first_at[doc.id] = i
        metadata_json = []
        for i, doc in enumerate(docs):
            if not isinstance(doc.text, str) or not isinstance(doc.title, str):
                raise InvalidArgument(f"documents[{i}]", "text and title must be strings")
            if not isinstance(doc.metadata, dict) or not all(isinstance(k, str) for k in doc.metadata):
                raise InvalidArgument(f"documents[{i}].metadata", "must be a JSON object with string keys")
            try:
                metadata_json.append(json.dumps(doc.metadata, allow_nan=False, ensure_ascii=False,
                                                separators=(",", ":")))
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"documents[{i}].metadata", f"not JSON ({exc})") from None
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(docs):
            raise InvalidArgument("documents", f"{len(docs)} documents but vectors of shape {tuple(matrix.shape)}")
        if matrix.shape[1] != self._dimension:
            raise InvalidArgument("documents[0].embedding",
                                  f"has {matrix.shape[1]} values; the index dimension is {self._dimension}")
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            raise InvalidArgument(f"documents[{int(np.argmin(finite))}].embedding", "contains NaN or infinity")
        if self._settings.metric == "cos":
            zero = ~np.any(matrix != 0, axis=1)
            if zero.any():
                raise InvalidArgument(f"documents[{int(np.argmax(zero))}].embedding",
                                      "is all zeros, which has no direction under the cos metric")
        return np.ascontiguousarray(matrix), metadata_json

    def upsert(self, docs: Sequence[StoredDoc], vectors: Any) -> tuple[int, int]:
        """Insert or replace `docs` (row i of `vectors` is docs[i]'s embedding), all or nothing.
        Returns (inserted, updated). Durable when it returns."""
        matrix, metadata_json = self._check_documents(docs, vectors)
        with self._write_mutex:
            self._check_writable()
            store = self._store
            conn = store.writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = store.existing([d.id for d in docs], conn)
                if old:
                    for chunk in _chunks(list(old.values())):
                        conn.execute(f"DELETE FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk)
                new_keys = []
                for doc, meta, vector in zip(docs, metadata_json, matrix):
                    cur = conn.execute(
                        "INSERT INTO documents(id, text, title, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                        (doc.id, doc.text, doc.title, meta, vector.astype("<f4").tobytes()))
                    new_keys.append(cur.lastrowid)
                seq = store.bump_seq(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._commit_and_apply(conn, seq, remove=list(old.values()),
                                   add=(np.array(new_keys, dtype=np.uint64), matrix))
        return len(docs) - len(old), len(old)

    def delete(self, ids: Iterable[str]) -> tuple[int, list[str]]:
        """Remove documents by id, all or nothing. Returns (deleted, ids that were not stored)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise InvalidArgument("ids", "at least one id is required")
        with self._write_mutex:
            self._check_writable()
            store = self._store
            conn = store.writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = store.existing(ids, conn)
                if not old:
                    conn.execute("ROLLBACK")
                    return 0, ids
                for chunk in _chunks(list(old.values())):
                    conn.execute(f"DELETE FROM documents WHERE key IN ({_placeholders(len(chunk))})", chunk)
                seq = store.bump_seq(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._commit_and_apply(conn, seq, remove=list(old.values()), add=None)
        return len(old), [i for i in ids if i not in old]

    def _commit_and_apply(self, conn: sqlite3.Connection, seq: int, remove: list[int],
                          add: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Stage the new vectors in the graph (hidden from searches), then commit the open transaction
        and make the graph match it, with searches held off only for that last step."""
        keys, vectors = add if add is not None else (np.zeros(0, np.uint64), None)
        try:
            for start in range(0, len(keys), _ADD_CHUNK):
                chunk = keys[start:start + _ADD_CHUNK]
                with self._ann_mutex:
                    self._pending.update(chunk.tolist())
                    self._hnsw.add(chunk, vectors[start:start + _ADD_CHUNK], threads=0)
        except BaseException:
            self._unstage()
            conn.execute("ROLLBACK")
            raise
        with self._rw.write():
            try:
                conn.execute("COMMIT")
            except BaseException:
                self._unstage()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                with self._ann_mutex:
                    if remove:
                        self._hnsw.remove(np.array(remove, dtype=np.uint64))
                    self._pending.clear()
                self._count += len(keys) - len(remove)
                self._seq = seq
            except BaseException as exc:  # committed but not applied: refuse further writes
                self._failed = f"applying write {seq} to the graph failed: {exc}"
                log.error("index %s: %s", self.path, self._failed)
                raise

    def _unstage(self) -> None:
        """Take the pending (uncommitted) keys out of the graph again."""
        with self._ann_mutex:
            staged = [key for key in self._pending if self._hnsw.contains(key)]
            if staged:
                self._hnsw.remove(np.array(staged, dtype=np.uint64))
            self._pending.clear()

    # ------------------------------------------------------------------ snapshots
    def save(self) -> bool:
        """Write a snapshot of the graph if it changed since the last one; True if one was written."""
        self._check_open()
        if self._settings.view:
            return False
        with self._write_mutex:
            if self._failed or self._seq == self._snapshot_seq:
                self._last_save = time.monotonic()
                return False
            self._save_snapshot()
            return True

    def maybe_save(self, interval_s: float) -> bool:
        """`save` when at least `interval_s` seconds passed since the last snapshot (server timer)."""
        if self._settings.view or time.monotonic() - self._last_save < interval_s:
            return False
        return self.save()

    def _save_snapshot(self) -> None:
        """Write hnsw-<seq>.usearch and then snapshot.json, each atomically (caller excludes writers)."""
        seq, hnsw, s = self._seq, self._hnsw, self._settings
        name = f"{SNAPSHOT_PREFIX}{seq:012d}{SNAPSHOT_SUFFIX}"
        final = self.path / name
        tmp = self.path / (name + ".tmp")
        started = time.monotonic()
        hnsw.save(tmp)
        _fsync_file(tmp)
        meta = {"file": name, "seq": seq, "count": len(hnsw), "bytes": tmp.stat().st_size,
                "sha256": _sha256_file(tmp), "dimension": self._dimension, "metric": s.metric,
                "dtype": s.dtype, "connectivity": s.connectivity, "written_at": time.time()}
        os.replace(tmp, final)
        _fsync_dir(self.path)
        _write_atomically(self.path / SNAPSHOT_META_FILE, json.dumps(meta, indent=1).encode())
        for old in self.path.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}*"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self._snapshot_seq = seq
        self._last_save = time.monotonic()
        log.info("index %s: snapshot %s (%d documents) in %.2f s", self.path, name, len(hnsw),
                 self._last_save - started)

    def close(self) -> None:
        """Snapshot if needed, then release files and the directory lock."""
        if self._closed:
            return
        try:
            if not self._settings.view and self._hnsw is not None:
                self.save()
        finally:
            self._closed = True
            with self._write_mutex, self._rw.write():
                self._store.close()
                if self._hnsw is not None:
                    self._hnsw.reset()
                    self._hnsw = None
                self._lock.release()

    def __enter__(self) -> "DocumentIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

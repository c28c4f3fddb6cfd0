"""Snapshots of the embedded backend's HNSW graph: write, check, load, bring up to date, or rebuild.

The graph lives in memory and is written now and then: to a temporary file, fsync, rename, then snapshot.json
(file name, size, sha256, sequence, settings) is replaced the same way, so a crash at any moment leaves the
previous complete snapshot in force. On open the snapshot is checked (size, sha256, settings, not ahead of
the store) and loaded, then brought up to date with the store: keys are allocated monotonically and never
reused, so a key present in both holds the same vector, and replaying the writes after the snapshot amounts to
adding the store keys the snapshot lacks and removing the keys the store no longer has. A missing, corrupt or
stale-beyond-repair snapshot (or different HNSW settings) makes the graph be rebuilt from the stored vectors.
After `load` the graph keys and the store keys are the same set.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twostage.server.errors import FailedPrecondition

from .ann import Index, graph_keys, new_graph
from .durable import fsync_dir, fsync_file, sha256_file, write_atomically
from .layout import SNAPSHOT_META_FILE, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX, DirectoryLock
from .settings import IndexSettings
from .store import READ_CHUNK, DocumentStore, chunks

log = logging.getLogger("twostage.index")


@dataclass
class Loaded:
    """A graph ready to serve: it reflects store sequence `seq`; `snapshot_seq` is the sequence of the snapshot
    on disk that equals it (-1: none does); `how` says how it was obtained (for logs and tests)."""

    hnsw: Index
    seq: int
    snapshot_seq: int
    how: str


def write_snapshot(directory: Path, hnsw: Index, seq: int, dimension: int, settings: IndexSettings) -> None:
    """Write hnsw-<seq>.usearch and then snapshot.json, each atomically, and drop older snapshot files (the
    caller keeps writers out)."""
    s = settings
    name = f"{SNAPSHOT_PREFIX}{seq:012d}{SNAPSHOT_SUFFIX}"
    final = directory / name
    tmp = directory / (name + ".tmp")
    started = time.monotonic()
    hnsw.save(tmp)
    fsync_file(tmp)
    meta = {"file": name, "seq": seq, "count": len(hnsw), "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp), "dimension": dimension, "metric": s.metric,
            "dtype": s.dtype, "connectivity": s.connectivity, "written_at": time.time()}
    os.replace(tmp, final)
    fsync_dir(directory)
    write_atomically(directory / SNAPSHOT_META_FILE, json.dumps(meta, indent=1).encode())
    for old in directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}*"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.info("index %s: snapshot %s (%d documents) in %.2f s", directory, name, len(hnsw),
             time.monotonic() - started)


def _meta(directory: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((directory / SNAPSHOT_META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _meta_seq(directory: Path) -> int:
    meta = _meta(directory)
    return int(str(meta["seq"])) if meta else -1


def read_snapshot(directory: Path, dimension: int, settings: IndexSettings, store_seq: int, *,
                  view: bool) -> tuple[Index | None, str | None]:
    """Load (or map, with `view`) the current snapshot if it is whole and fits; else (None, why not)."""
    meta = _meta(directory)
    if meta is None:
        return None, "no snapshot" if not (directory / SNAPSHOT_META_FILE).exists() else "unreadable snapshot.json"
    s = settings
    try:
        file = directory / str(meta["file"])
        expected = {"dimension": dimension, "metric": s.metric, "dtype": s.dtype, "connectivity": s.connectivity}
        for name, want in expected.items():
            if meta[name] != want:
                return None, f"snapshot {name} {meta[name]!r} differs from {want!r}"
        if int(str(meta["seq"])) > store_seq:
            return None, f"snapshot sequence {meta['seq']} is ahead of the store ({store_seq})"
        if Path(str(meta["file"])).name != meta["file"] or not file.is_file():
            return None, f"snapshot file {meta['file']!r} missing"
        if file.stat().st_size != int(str(meta["bytes"])):
            return None, f"snapshot file {file.name} has {file.stat().st_size} bytes, expected {meta['bytes']}"
        if sha256_file(file) != meta["sha256"]:
            return None, f"snapshot file {file.name} fails its sha256 check"
        hnsw = Index.restore(file, view=view, connectivity=s.connectivity,
                             expansion_add=s.expansion_add, expansion_search=s.expansion_search)
    except Exception as exc:  # noqa: BLE001 - any failure to read it means: rebuild
        return None, f"snapshot unusable ({type(exc).__name__}: {exc})"
    if hnsw is None or hnsw.ndim != dimension or len(hnsw) != int(str(meta["count"])):
        return None, "snapshot header does not match snapshot.json"
    return hnsw, None


def in_step(hnsw: Index, store: DocumentStore) -> bool:
    """Whether the graph holds exactly the store's keys."""
    keys = graph_keys(hnsw)
    stored = store.keys()
    return len(keys) == len(stored) and np.array_equal(np.sort(keys), np.sort(stored))


def reconcile(hnsw: Index, store: DocumentStore) -> tuple[int, int]:
    """Replay the store's writes after the snapshot: add missing keys, remove deleted ones; (added, removed)."""
    index_keys = graph_keys(hnsw)
    store_keys = store.keys()
    extra = np.setdiff1d(index_keys, store_keys, assume_unique=True)
    missing = np.setdiff1d(store_keys, index_keys, assume_unique=True)
    if len(extra):
        hnsw.remove(extra)
    for chunk in chunks(missing.tolist(), READ_CHUNK):
        keys, vectors = store.vectors_of(chunk)
        if len(keys):
            hnsw.add(keys, vectors, threads=0)
    return len(missing), len(extra)


def _rebuild(directory: Path, store: DocumentStore, dimension: int, settings: IndexSettings, store_seq: int,
             reason: str) -> Loaded:
    hnsw = new_graph(dimension, settings)
    if store_seq == 0 and reason == "no snapshot":  # a new, empty index
        return Loaded(hnsw, store_seq, -1, "new")
    log.warning("index %s: rebuilding the HNSW graph from the document store (%s)", directory, reason)
    for keys, vectors in store.iter_vectors():
        hnsw.add(keys, vectors, threads=0)
    snapshot_seq = -1
    if len(hnsw):
        write_snapshot(directory, hnsw, store_seq, dimension, settings)
        snapshot_seq = store_seq
    return Loaded(hnsw, store_seq, snapshot_seq, f"rebuild ({reason})")


def _load_writable(directory: Path, store: DocumentStore, dimension: int, settings: IndexSettings,
                   store_seq: int, snapshot: Index | None, reason: str | None) -> Loaded:
    if snapshot is None:
        return _rebuild(directory, store, dimension, settings, store_seq, reason or "no snapshot")
    snapshot_seq = _meta_seq(directory)
    added, removed = reconcile(snapshot, store)
    how = "snapshot" if not (added or removed) else f"snapshot + replay (+{added} -{removed})"
    if added or removed:
        snapshot_seq = -1  # the graph in memory is newer than the file
    log.info("index %s: opened from %s, %d documents", directory, how, len(snapshot))
    return Loaded(snapshot, store_seq, snapshot_seq, how)


def load(directory: Path, store: DocumentStore, dimension: int, settings: IndexSettings,
         lock: DirectoryLock) -> Loaded:
    """The graph for the store in `directory`, from its snapshot when it can be used. A read-only view maps the
    snapshot; when that is behind the store it first writes a current one (taking the directory lock
    exclusively for that moment, which fails while another process has the index open)."""
    store_seq = store.seq()
    snapshot, reason = read_snapshot(directory, dimension, settings, store_seq, view=settings.view)
    if not settings.view:
        loaded = _load_writable(directory, store, dimension, settings, store_seq, snapshot, reason)
        if not in_step(loaded.hnsw, store):
            raise FailedPrecondition(f"index {directory}: HNSW keys and document store keys differ after open")
        return loaded
    if snapshot is not None and in_step(snapshot, store):
        return Loaded(snapshot, store_seq, store_seq, "snapshot (view)")
    if not lock.try_upgrade():
        raise FailedPrecondition(
            f"the snapshot in {directory} is behind its document store ({reason or 'keys differ'}) and "
            f"another process has the index open; open it read-write once to write a current snapshot")
    try:
        if snapshot is not None:
            snapshot.reset()
        writable, writable_reason = read_snapshot(directory, dimension, settings, store_seq, view=False)
        loaded = _load_writable(directory, store, dimension, settings, store_seq, writable, writable_reason)
        if loaded.snapshot_seq != loaded.seq:
            write_snapshot(directory, loaded.hnsw, loaded.seq, dimension, settings)
        loaded.hnsw.reset()
    finally:
        lock.downgrade()
    snapshot, reason = read_snapshot(directory, dimension, settings, store_seq, view=True)
    if snapshot is None:
        raise FailedPrecondition(f"could not map the snapshot just written in {directory}: {reason}")
    return Loaded(snapshot, store_seq, store_seq, "snapshot (view, refreshed)")

"""The embedded index's directory: file names, the directory lock, and the swap `index build` finishes with.

Files in an index directory:

    documents.sqlite3 (+ -wal, -shm)  the source of truth: every document's id, text, title, metadata
                                      (JSON) and float32 vector, keyed by a 64-bit integer `key`, and the
                                      FTS5 lexical index over titles and texts (store.py)
    hnsw-<seq>.usearch                a snapshot of the HNSW graph as of change sequence <seq>
    snapshot.json                     names the current snapshot file, its size, sha256 and sequence
    LOCK                              flock()ed while a process has the index open

Beside it, `index build` uses <dir>.tmp-build (the build in progress) and <dir>.old-build (the previous index,
for the moment of the swap); `recover_index_dir` finishes or undoes a swap a crash interrupted.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from twostage.server.errors import FailedPrecondition

from .durable import fsync_dir

STORE_FILE = "documents.sqlite3"
SNAPSHOT_META_FILE = "snapshot.json"
LOCK_FILE = "LOCK"
SNAPSHOT_PREFIX = "hnsw-"
SNAPSHOT_SUFFIX = ".usearch"
# Directory names used by `index build` (see replace_index_dir / recover_index_dir).
STAGING_SUFFIX = ".tmp-build"
ASIDE_SUFFIX = ".old-build"
BUILD_COMPLETE_FILE = "build-complete.json"


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
            fsync_dir(parent)
        os.rename(new_dir, index_dir)
        fsync_dir(parent)
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
        fsync_dir(index_dir.parent)
        shutil.rmtree(aside)
        return f"finished an interrupted index swap: moved {staging} to {index_dir}"
    os.rename(aside, index_dir)
    fsync_dir(index_dir.parent)
    return f"undid an interrupted index swap: moved {aside} back to {index_dir}"

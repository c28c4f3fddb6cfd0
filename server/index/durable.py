"""Durable files: fsync helpers, atomic replacement, and the checksum snapshots are verified with.

A rename is durable only once the directory holding it is fsynced, and a file's content only once the file is;
`write_atomically` does both so that a crash leaves either the old or the new content, never a mix.
"""
from __future__ import annotations

import os
from pathlib import Path

# The project's one streaming sha256 of a file (model manifests use it too).
from twostage.model.manifest import sha256_file

__all__ = ["fsync_dir", "fsync_file", "sha256_file", "write_atomically"]


def fsync_file(path: Path) -> None:
    """Flush `path` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush the entries of directory `path` (renames, creations and deletions in it) to disk."""
    fsync_file(path)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

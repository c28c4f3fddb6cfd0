"""Writing a model directory's `manifest.json` (the contract and its reader: twostage.model.manifest).
Pure standard library, like the reader."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twostage.model.manifest import FORMAT, MANIFEST_NAME, REQUIRED_FIELDS, ManifestError, sha256_file


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every regular file below `directory` except the manifest, keyed by relative POSIX path."""
    directory = Path(directory)
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME and not path.name.startswith(".tmp"):
            out[path.relative_to(directory).as_posix()] = sha256_file(path)
    return out


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Fill in `files` (checksums of the directory as it is now) and write manifest.json atomically."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = hash_directory(directory)
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ManifestError(f"{directory / MANIFEST_NAME}: refusing to write, missing fields {missing}")
    target = directory / MANIFEST_NAME
    tmp = directory / f".tmp-{MANIFEST_NAME}"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target
